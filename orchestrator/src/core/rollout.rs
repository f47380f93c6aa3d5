//! The rollout state machine (issue 13): a release reaches a fleet batch by
//! batch. Pure: time comes in as `now_ms`, the result is a list of
//! [`Effect`]s for the engine to carry out. Serialisable so the engine can
//! persist it and resume it after a restart ([`Rollout::resume_effects`]).
//!
//! Batches are per batch (like FlightCtl): `[Count(1), Percent(50)]` means
//! one device, then half the targets, then the last batch takes the rest.
//! A percentage rounds down, to at least one device. An empty list is one
//! batch of everything. Device ids are sorted, so the batches are
//! deterministic.
//!
//! Cost: `observe`, `device_gone` and each expired deadline of `tick` are
//! O(log n) plus O(1) per device they start; `next_deadline` is O(log n).
//! Counters are kept per batch, the current batch's Pending devices are
//! found through a cursor (every device before it is no longer Pending),
//! and the deadlines of Updating, Ready and RollingBack devices are kept in
//! an ordered index (rebuilt on deserialisation, not stored).
//!
//! Device transitions (`DeviceProgress`):
//! - Pending → Updating (started by the running batch, `SetRelease` to),
//!   Pending → Skipped (device gone).
//! - Updating → Ready (reports the target release, ready; with
//!   `min_ready_ms == 0` straight to Updated), Updating → Failed (reports
//!   the target release failed, or `device_timeout_ms` passes).
//! - Ready → Updated (ready for `min_ready_ms`), Ready → Updating (no
//!   longer ready: the min-ready timer restarts, the device timeout still
//!   counts from when it was started), Ready → Failed (reports failed).
//! - Updated, Failed: final within the rollout. An Updated device that
//!   reports another release (or unready) stays Updated: keeping it on its
//!   desired release is the fleet's level-triggered reconciliation, not the
//!   rollout's. A Failed device that later turns healthy stays Failed.
//! - Any touched device (Updating, Ready, Updated, Failed) → RollingBack
//!   on a rollback (`SetRelease` from); RollingBack → RolledBack (reports
//!   the old release), RollingBack → Failed (timeout).
//! - Any non-Skipped → Skipped (device gone), in a phase that is not final.
//! - Updating, Ready, RollingBack → Failed (`device_failed`: the fleet
//!   refuses the release on that device, e.g. a host port another app
//!   takes), at once and with the fleet's reason.
//!
//! Rollout transitions (`Phase`):
//! - Running → WaitingApproval (a batch ended, `approval`), → Paused
//!   (operator, or `FailurePolicy::Pause`), → RollingBack (operator, or
//!   `FailurePolicy::Rollback`), → Succeeded / Failed (the last batch
//!   ended; Failed when a device failed), → Aborted, → Superseded.
//! - WaitingApproval → Running (approve), → Paused, → RollingBack,
//!   → Aborted, → Superseded.
//! - Paused → the phase it was paused from (resume; after a failure pause
//!   the operator's resume accepts the current batch's failures), →
//!   RollingBack, → Aborted, → Superseded.
//! - RollingBack → RolledBack (no device left RollingBack), → Aborted,
//!   → Superseded.

use std::collections::{BTreeMap, BTreeSet};

use drover_shared::model::{AppPhase, AppStatus, Health};
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::contract;
pub use crate::contract::BatchSize;

/// What to do when a batch can no longer reach its success threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    #[default]
    Rollback,
    Pause,
    Continue,
}

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub app: Name,
    /// Display only; the engine resolves it to devices.
    pub selector: String,
    pub to_release: u64,
    pub batches: Vec<BatchSize>,
    /// At most this many devices Updating (or Ready, not yet for
    /// `min_ready_ms`) at once within the running batch.
    pub max_unavailable: Option<BatchSize>,
    pub success_threshold_percent: u8,
    pub on_failure: FailurePolicy,
    pub device_timeout_ms: u64,
    pub min_ready_ms: u64,
    /// Wait for [`Rollout::approve`] between batches.
    pub approval: bool,
    /// Who created it (an API token's name).
    pub author: String,
    /// An agent rollout of this version: `app` is only its key, releases
    /// are agent release numbers (0: the packaged binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// A bad spec or an invalid transition; names the field or the phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutError {
    Field { field: String, message: String },
    InvalidTransition { action: &'static str, phase: Phase },
}

impl std::fmt::Display for RolloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RolloutError::Field { field, message } => write!(f, "{field}: {message}"),
            RolloutError::InvalidTransition { action, phase } => {
                write!(f, "cannot {action} a rollout that is {phase:?}")
            }
        }
    }
}

impl std::error::Error for RolloutError {}

fn field(field: &str, message: &str) -> RolloutError {
    RolloutError::Field {
        field: field.into(),
        message: message.into(),
    }
}

fn check_size(name: &str, b: BatchSize) -> Result<(), RolloutError> {
    match b {
        BatchSize::Count(0) => Err(field(name, "must be at least 1")),
        BatchSize::Percent(p) if p == 0 || p > 100 => {
            Err(field(name, "a percentage must be 1% to 100%"))
        }
        _ => Ok(()),
    }
}

impl RolloutSpec {
    pub fn validate(&self) -> Result<(), RolloutError> {
        if self.to_release == 0 {
            return Err(field("to_release", "must be at least 1"));
        }
        for (i, b) in self.batches.iter().enumerate() {
            check_size(&format!("batches[{i}]"), *b)?;
        }
        if let Some(b) = self.max_unavailable {
            check_size("max_unavailable", b)?;
        }
        if self.success_threshold_percent > 100 {
            return Err(field("success_threshold_percent", "must be 0..=100"));
        }
        if self.device_timeout_ms == 0 {
            return Err(field("device_timeout_ms", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Running,
    WaitingApproval,
    /// Paused by the operator or by `FailurePolicy::Pause`.
    Paused,
    RollingBack,
    Succeeded,
    /// Finished with failures under `FailurePolicy::Continue` (or a
    /// threshold below 100 %).
    Failed,
    RolledBack,
    Aborted,
    Superseded,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Succeeded
                | Phase::Failed
                | Phase::RolledBack
                | Phase::Aborted
                | Phase::Superseded
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceProgress {
    Pending,
    Updating {
        since_ms: u64,
    },
    Ready {
        since_ms: u64,
        updating_since_ms: u64,
    },
    Updated,
    Failed {
        reason: String,
    },
    RollingBack {
        since_ms: u64,
    },
    RolledBack,
    Skipped,
}

/// Derived by the engine from a device state report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The release of the app the device runs; 0 = app absent.
    pub release: u64,
    pub ready: bool,
    pub failed: Option<String>,
}

/// What a device's report of `app` means for a rollout (see
/// [`crate::core::fleet::Fleet::rollout_observation`]): `status` is the
/// app in the report (`None`: absent), `current` whether the report
/// answers the device's latest desired state, `told` the release that
/// desired state gives the app.
pub fn observe_app(status: Option<&AppStatus>, current: bool, told: u64) -> Observation {
    let Some(a) = status else {
        return Observation {
            release: 0,
            ready: true,
            failed: None,
        };
    };
    let unhealthy = a
        .containers
        .iter()
        .find(|c| c.health == Some(Health::Unhealthy));
    let failed = if a.phase == AppPhase::Failed {
        Some(a.error.clone().unwrap_or_else(|| "the app failed".into()))
    } else {
        unhealthy.map(|c| format!("container {} is unhealthy", c.name))
    };
    let release = if a.release == 0 && failed.is_some() && current {
        told
    } else {
        a.release
    };
    let healthy = a
        .containers
        .iter()
        .all(|c| c.state == "running" && matches!(c.health, None | Some(Health::Healthy)));
    let ready = match a.phase {
        AppPhase::Running => healthy,
        AppPhase::Stopped | AppPhase::Paused => true,
        _ => false,
    };
    Observation {
        release,
        ready,
        failed,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Set the app's desired release on a device; 0 = remove the app.
    SetRelease {
        device: DeviceId,
        release: u64,
    },
    /// Persist and publish progress.
    Changed,
    Finished(Phase),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DeviceEntry {
    batch: usize,
    from_release: u64,
    progress: DeviceProgress,
    /// Touched by this rollout (set to the target at least once).
    touched: bool,
    /// Why it last failed: kept when a rollback moves it on, so a rolled
    /// back device still says what went wrong on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    pub total: usize,
    pub pending: usize,
    /// Updating or Ready (not yet for min_ready).
    pub updating: usize,
    pub updated: usize,
    pub failed: usize,
    pub skipped: usize,
    #[serde(default)]
    pub rolling_back: usize,
    #[serde(default)]
    pub rolled_back: usize,
}

impl BatchCounts {
    fn slot(&mut self, p: &DeviceProgress) -> &mut usize {
        match p {
            DeviceProgress::Pending => &mut self.pending,
            DeviceProgress::Updating { .. } | DeviceProgress::Ready { .. } => &mut self.updating,
            DeviceProgress::Updated => &mut self.updated,
            DeviceProgress::Failed { .. } => &mut self.failed,
            DeviceProgress::Skipped => &mut self.skipped,
            DeviceProgress::RollingBack { .. } => &mut self.rolling_back,
            DeviceProgress::RolledBack => &mut self.rolled_back,
        }
    }

    fn eligible(&self) -> usize {
        self.total - self.skipped
    }
}

/// Progress per batch and overall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub current_batch: usize,
    pub batches: Vec<BatchCounts>,
    pub percent: u8,
}

/// What is persisted: everything but the deadline index.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    id: String,
    spec: RolloutSpec,
    created_at_ms: u64,
    phase: Phase,
    /// Phase to return to on resume.
    paused_from: Option<Phase>,
    /// The operator resumed after a failure pause: the current batch's
    /// failures no longer stop it. Reset when the next batch starts.
    failures_accepted: bool,
    /// Paused by `FailurePolicy::Pause` (not by the operator).
    #[serde(default)]
    failure_paused: bool,
    /// The release most targets ran before.
    from_release: u64,
    batches: Vec<Vec<DeviceId>>,
    devices: BTreeMap<DeviceId, DeviceEntry>,
    current: usize,
    /// Every device of `batches[current]` before it is no longer Pending.
    cursor: usize,
    counts: Vec<BatchCounts>,
    rolling_back: usize,
    /// Why it last stopped, paused or rolled back, in words.
    #[serde(default)]
    reason: Option<String>,
    /// When it last changed (a device's progress or its phase).
    #[serde(default)]
    updated_at_ms: u64,
    #[serde(default)]
    finished_at_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Rollout {
    s: State,
    /// (deadline, device) of every Updating, Ready and RollingBack device.
    deadlines: BTreeSet<(u64, DeviceId)>,
}

impl Serialize for Rollout {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.s.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Rollout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = State::deserialize(d)?;
        let mut r = Rollout {
            s,
            deadlines: BTreeSet::new(),
        };
        let index: BTreeSet<_> =
            r.s.devices
                .iter()
                .filter_map(|(d, e)| r.deadline_of(&e.progress).map(|t| (t, d.clone())))
                .collect();
        r.deadlines = index;
        Ok(r)
    }
}

impl Rollout {
    /// Creates a rollout over `targets` (device id → current release, 0 =
    /// app absent) and starts the first batch.
    pub fn new(
        id: String,
        spec: RolloutSpec,
        targets: BTreeMap<DeviceId, u64>,
        now_ms: u64,
    ) -> Result<(Self, Vec<Effect>), RolloutError> {
        spec.validate()?;
        if targets.is_empty() {
            return Err(field("selector", "matches no device"));
        }
        let ids: Vec<DeviceId> = targets.keys().cloned().collect();
        let total = ids.len();
        let mut batches = Vec::new();
        let mut rest = &ids[..];
        for b in &spec.batches {
            if rest.is_empty() {
                break;
            }
            let n = b.of(total).clamp(1, rest.len());
            batches.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        if !rest.is_empty() {
            batches.push(rest.to_vec());
        }
        let mut from_counts: BTreeMap<u64, usize> = BTreeMap::new();
        for r in targets.values() {
            *from_counts.entry(*r).or_default() += 1;
        }
        let from_release = from_counts
            .iter()
            .max_by_key(|(r, n)| (**n, **r))
            .map_or(0, |(r, _)| *r);
        let mut devices = BTreeMap::new();
        let mut counts = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            counts.push(BatchCounts {
                total: batch.len(),
                pending: batch.len(),
                ..Default::default()
            });
            for d in batch {
                devices.insert(
                    d.clone(),
                    DeviceEntry {
                        batch: i,
                        from_release: targets[d],
                        progress: DeviceProgress::Pending,
                        touched: false,
                        failure: None,
                    },
                );
            }
        }
        let mut r = Rollout {
            s: State {
                id,
                spec,
                created_at_ms: now_ms,
                phase: Phase::Running,
                paused_from: None,
                failures_accepted: false,
                failure_paused: false,
                from_release,
                batches,
                devices,
                current: 0,
                cursor: 0,
                counts,
                rolling_back: 0,
                reason: None,
                updated_at_ms: now_ms,
                finished_at_ms: None,
            },
            deadlines: BTreeSet::new(),
        };
        let mut fx = Vec::new();
        r.advance(now_ms, &mut fx);
        Ok((r, Self::done(true, fx)))
    }

    pub fn id(&self) -> &str {
        &self.s.id
    }

    pub fn spec(&self) -> &RolloutSpec {
        &self.s.spec
    }

    pub fn phase(&self) -> Phase {
        self.s.phase
    }

    pub fn created_at_ms(&self) -> u64 {
        self.s.created_at_ms
    }

    /// The release most of its devices ran before it (0: none had the app).
    pub fn from_release(&self) -> u64 {
        self.s.from_release
    }

    /// The devices of each batch, in order.
    pub fn batches(&self) -> &[Vec<DeviceId>] {
        &self.s.batches
    }

    fn deadline_of(&self, p: &DeviceProgress) -> Option<u64> {
        let t = self.s.spec.device_timeout_ms;
        match *p {
            DeviceProgress::Updating { since_ms } | DeviceProgress::RollingBack { since_ms } => {
                Some(since_ms.saturating_add(t))
            }
            DeviceProgress::Ready { since_ms, .. } => {
                Some(since_ms.saturating_add(self.s.spec.min_ready_ms))
            }
            _ => None,
        }
    }

    /// The one place a device's progress changes: keeps the counters and
    /// the deadline index in step. O(log n).
    fn set(&mut self, device: &DeviceId, p: DeviceProgress) {
        let old_deadline = self.deadline_of(&self.s.devices[device].progress);
        let new_deadline = self.deadline_of(&p);
        if let Some(t) = old_deadline {
            self.deadlines.remove(&(t, device.clone()));
        }
        if let Some(t) = new_deadline {
            self.deadlines.insert((t, device.clone()));
        }
        let e = self.s.devices.get_mut(device).expect("known device");
        if let DeviceProgress::Failed { reason } = &p {
            e.failure = Some(reason.clone());
        }
        let c = &mut self.s.counts[e.batch];
        *c.slot(&e.progress) -= 1;
        *c.slot(&p) += 1;
        let was_rb = matches!(e.progress, DeviceProgress::RollingBack { .. });
        let is_rb = matches!(p, DeviceProgress::RollingBack { .. });
        if was_rb && !is_rb {
            self.s.rolling_back -= 1;
        }
        if !was_rb && is_rb {
            self.s.rolling_back += 1;
        }
        e.progress = p;
    }

    fn max_updating(&self) -> usize {
        match self.s.spec.max_unavailable {
            None => usize::MAX,
            Some(b) => b.of(self.s.devices.len()).max(1),
        }
    }

    fn threshold_met(&self, b: usize) -> bool {
        let c = &self.s.counts[b];
        c.updated * 100 >= c.eligible() * self.s.spec.success_threshold_percent as usize
    }

    fn threshold_unreachable(&self, b: usize) -> bool {
        let c = &self.s.counts[b];
        (c.eligible() - c.failed) * 100
            < c.eligible() * self.s.spec.success_threshold_percent as usize
    }

    /// Starts Pending devices in the running batch, moves to the next batch
    /// or finishes. Cost: O(log n) per device started or passed by the
    /// cursor (each device is passed once).
    fn advance(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        loop {
            if self.s.phase != Phase::Running {
                return;
            }
            let b = self.s.current;
            if !self.s.failures_accepted && self.threshold_unreachable(b) {
                let c = &self.s.counts[b];
                let why = format!(
                    "batch {} of {}: {} of {} devices failed; the success threshold of {}% can no longer be met",
                    b + 1,
                    self.s.batches.len(),
                    c.failed,
                    c.eligible(),
                    self.s.spec.success_threshold_percent
                );
                match self.s.spec.on_failure {
                    FailurePolicy::Rollback => {
                        self.s.reason = Some(format!("{why}: rolling back"));
                        return self.start_rollback(now_ms, fx);
                    }
                    FailurePolicy::Pause => {
                        self.s.reason = Some(format!("{why}: paused"));
                        self.s.phase = Phase::Paused;
                        self.s.paused_from = Some(Phase::Running);
                        self.s.failure_paused = true;
                        fx.push(Effect::Changed);
                        return;
                    }
                    FailurePolicy::Continue => {}
                }
            }
            let mut room = self
                .max_updating()
                .saturating_sub(self.s.counts[b].updating);
            while room > 0 && self.s.counts[b].pending > 0 {
                let d = self.s.batches[b][self.s.cursor].clone();
                self.s.cursor += 1;
                if self.s.devices[&d].progress != DeviceProgress::Pending {
                    continue;
                }
                self.set(&d, DeviceProgress::Updating { since_ms: now_ms });
                self.s.devices.get_mut(&d).expect("known device").touched = true;
                fx.push(Effect::SetRelease {
                    device: d,
                    release: self.s.spec.to_release,
                });
                room -= 1;
            }
            let c = &self.s.counts[b];
            if c.pending > 0 || c.updating > 0 {
                return;
            }
            // The batch is done; with a threshold not met the policy above
            // already stopped, unless it is Continue or the operator
            // accepted the failures.
            debug_assert!(
                self.threshold_met(b)
                    || self.s.failures_accepted
                    || self.s.spec.on_failure == FailurePolicy::Continue
            );
            if b + 1 == self.s.batches.len() {
                let any_failed = self.s.counts.iter().any(|c| c.failed > 0);
                let phase = if any_failed {
                    Phase::Failed
                } else {
                    Phase::Succeeded
                };
                return self.finish(phase, now_ms, fx);
            }
            self.s.current += 1;
            self.s.cursor = 0;
            self.s.failures_accepted = false;
            fx.push(Effect::Changed);
            if self.s.spec.approval {
                self.s.phase = Phase::WaitingApproval;
                return;
            }
        }
    }

    fn finish(&mut self, phase: Phase, now_ms: u64, fx: &mut Vec<Effect>) {
        self.s.phase = phase;
        self.s.finished_at_ms = Some(now_ms);
        self.s.paused_from = None;
        self.s.failure_paused = false;
        self.deadlines.clear();
        fx.push(Effect::Finished(phase));
    }

    /// Every touched device goes back to the release it ran before. O(n),
    /// once per rollout.
    fn start_rollback(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        self.s.phase = Phase::RollingBack;
        self.s.paused_from = None;
        self.s.failure_paused = false;
        let back: Vec<(DeviceId, u64)> = self
            .s
            .devices
            .iter()
            .filter(|(_, e)| {
                e.touched
                    && !matches!(
                        e.progress,
                        DeviceProgress::Skipped
                            | DeviceProgress::RolledBack
                            | DeviceProgress::RollingBack { .. }
                    )
            })
            .map(|(d, e)| (d.clone(), e.from_release))
            .collect();
        for (d, from) in back {
            self.set(&d, DeviceProgress::RollingBack { since_ms: now_ms });
            fx.push(Effect::SetRelease {
                device: d,
                release: from,
            });
        }
        if self.s.rolling_back == 0 {
            self.finish(Phase::RolledBack, now_ms, fx);
        }
    }

    /// The effects with exactly one leading `Changed` when anything
    /// changed, none when nothing did.
    fn done(changed: bool, mut fx: Vec<Effect>) -> Vec<Effect> {
        if !changed && fx.is_empty() {
            return fx;
        }
        fx.retain(|e| *e != Effect::Changed);
        fx.insert(0, Effect::Changed);
        fx
    }

    /// A device reported its state. Idempotent: the same observation twice
    /// yields no effects the second time. O(log n) plus the devices it
    /// starts.
    pub fn observe(&mut self, device: &DeviceId, obs: Observation, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.s.phase.is_final() {
            return fx;
        }
        let Some(e) = self.s.devices.get(device) else {
            return fx;
        };
        let to = self.s.spec.to_release;
        let next = match e.progress {
            DeviceProgress::Updating {
                since_ms: updating_since_ms,
            }
            | DeviceProgress::Ready {
                updating_since_ms, ..
            } => {
                let is_ready = matches!(e.progress, DeviceProgress::Ready { .. });
                match obs.failed {
                    Some(reason) if obs.release == to => Some(DeviceProgress::Failed { reason }),
                    _ if obs.release == to && obs.ready => {
                        if self.s.spec.min_ready_ms == 0 {
                            Some(DeviceProgress::Updated)
                        } else if is_ready {
                            None
                        } else {
                            Some(DeviceProgress::Ready {
                                since_ms: now_ms,
                                updating_since_ms,
                            })
                        }
                    }
                    _ if is_ready => Some(DeviceProgress::Updating {
                        since_ms: updating_since_ms,
                    }),
                    _ => None,
                }
            }
            DeviceProgress::RollingBack { .. } if obs.release == e.from_release => {
                Some(DeviceProgress::RolledBack)
            }
            _ => None,
        };
        let Some(p) = next else {
            return fx;
        };
        self.set(device, p);
        self.s.updated_at_ms = now_ms;
        self.check(now_ms, &mut fx);
        Self::done(true, fx)
    }

    /// Batch progression and rollback completion.
    fn check(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        match self.s.phase {
            Phase::RollingBack if self.s.rolling_back == 0 => {
                self.finish(Phase::RolledBack, now_ms, fx)
            }
            Phase::Running => self.advance(now_ms, fx),
            _ => {}
        }
    }

    /// Timeouts and min-ready. Call at [`Rollout::next_deadline`]. Also
    /// runs while Paused or WaitingApproval: a device's clock does not stop.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut changed = false;
        let mut fx = Vec::new();
        if self.s.phase.is_final() {
            return fx;
        }
        while let Some((at, d)) = self.deadlines.first().cloned() {
            if at > now_ms {
                break;
            }
            let next = match self.s.devices[&d].progress {
                DeviceProgress::Updating { .. } => DeviceProgress::Failed {
                    reason: format!(
                        "not ready within the device timeout ({} ms)",
                        self.s.spec.device_timeout_ms
                    ),
                },
                DeviceProgress::Ready { .. } => DeviceProgress::Updated,
                DeviceProgress::RollingBack { .. } => DeviceProgress::Failed {
                    reason: format!(
                        "rollback not done within the device timeout ({} ms)",
                        self.s.spec.device_timeout_ms
                    ),
                },
                _ => unreachable!("only Updating, Ready and RollingBack have deadlines"),
            };
            self.set(&d, next);
            changed = true;
        }
        if changed {
            self.s.updated_at_ms = now_ms;
            self.check(now_ms, &mut fx);
        }
        Self::done(changed, fx)
    }

    /// When `tick` must next be called, if ever. O(log n).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.s.phase.is_final() {
            return None;
        }
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// The device cannot be given the release (its other apps take a host
    /// port the release needs, it has too few CPUs): it fails at once, with
    /// the reason, instead of at its timeout. Only a device in flight.
    pub fn device_failed(&mut self, device: &DeviceId, reason: String, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.s.phase.is_final() {
            return fx;
        }
        match self.s.devices.get(device).map(|e| &e.progress) {
            Some(
                DeviceProgress::Updating { .. }
                | DeviceProgress::Ready { .. }
                | DeviceProgress::RollingBack { .. },
            ) => {}
            _ => return fx,
        }
        self.set(device, DeviceProgress::Failed { reason });
        self.s.updated_at_ms = now_ms;
        self.check(now_ms, &mut fx);
        Self::done(true, fx)
    }

    /// The device was deleted or left the selector: it is skipped (and not
    /// rolled back: it is no longer the rollout's).
    pub fn device_gone(&mut self, device: &DeviceId, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.s.phase.is_final() {
            return fx;
        }
        match self.s.devices.get(device) {
            None => return fx,
            Some(e) if e.progress == DeviceProgress::Skipped => return fx,
            Some(_) => {}
        }
        self.set(device, DeviceProgress::Skipped);
        self.s.updated_at_ms = now_ms;
        self.check(now_ms, &mut fx);
        Self::done(true, fx)
    }

    fn invalid(&self, action: &'static str) -> RolloutError {
        RolloutError::InvalidTransition {
            action,
            phase: self.s.phase,
        }
    }

    /// Starts no more devices until [`Rollout::resume`]; devices already
    /// updating go on and are observed.
    pub fn pause(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        match self.s.phase {
            Phase::Running | Phase::WaitingApproval => {
                self.s.paused_from = Some(self.s.phase);
                self.s.phase = Phase::Paused;
                self.s.reason = Some("paused by an operator".into());
                self.s.updated_at_ms = now_ms;
                Ok(vec![Effect::Changed])
            }
            _ => Err(self.invalid("pause")),
        }
    }

    /// Back to the phase it was paused from. After a pause by
    /// `FailurePolicy::Pause` the operator's resume accepts the current
    /// batch's failures: the batch goes on and the rollout can end Failed.
    /// After an operator's pause the failure policy applies as usual, also
    /// to failures reported while paused.
    pub fn resume(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.s.phase != Phase::Paused {
            return Err(self.invalid("resume"));
        }
        self.s.phase = self.s.paused_from.take().unwrap_or(Phase::Running);
        self.s.updated_at_ms = now_ms;
        self.s.reason = None;
        if std::mem::take(&mut self.s.failure_paused) {
            self.s.failures_accepted = true;
        }
        let mut fx = Vec::new();
        self.advance(now_ms, &mut fx);
        Ok(Self::done(true, fx))
    }

    /// Starts the next batch while WaitingApproval.
    pub fn approve(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.s.phase != Phase::WaitingApproval {
            return Err(self.invalid("approve"));
        }
        self.s.phase = Phase::Running;
        self.s.updated_at_ms = now_ms;
        let mut fx = Vec::new();
        self.advance(now_ms, &mut fx);
        Ok(Self::done(true, fx))
    }

    /// Stops without rollback; devices keep what they run.
    pub fn abort(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.s.phase.is_final() {
            return Err(self.invalid("abort"));
        }
        let mut fx = vec![Effect::Changed];
        self.s.reason = Some("aborted by an operator".into());
        self.s.updated_at_ms = now_ms;
        self.finish(Phase::Aborted, now_ms, &mut fx);
        Ok(fx)
    }

    /// Puts every device it touched back on its previous release.
    pub fn rollback(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.s.phase.is_final() || self.s.phase == Phase::RollingBack {
            return Err(self.invalid("roll back"));
        }
        let mut fx = vec![Effect::Changed];
        self.s.reason = Some("rolled back by an operator".into());
        self.s.updated_at_ms = now_ms;
        self.start_rollback(now_ms, &mut fx);
        Ok(fx)
    }

    /// A newer rollout of the same app took over: ends without rollback.
    pub fn supersede(&mut self, by: &str, now_ms: u64) -> Vec<Effect> {
        if self.s.phase.is_final() {
            return Vec::new();
        }
        let mut fx = vec![Effect::Changed];
        self.s.reason = Some(format!("superseded by rollout {by}"));
        self.s.updated_at_ms = now_ms;
        self.finish(Phase::Superseded, now_ms, &mut fx);
        fx
    }

    /// Why it last stopped, paused or rolled back.
    pub fn reason(&self) -> Option<&str> {
        self.s.reason.as_deref()
    }

    /// The devices it touched (set to the target at least once).
    pub fn touched(&self) -> impl Iterator<Item = (&DeviceId, &DeviceProgress)> {
        self.s
            .devices
            .iter()
            .filter(|(_, e)| e.touched)
            .map(|(d, e)| (d, &e.progress))
    }

    /// The release a device ran before the rollout (0: none).
    pub fn from_release_of(&self, device: &DeviceId) -> Option<u64> {
        self.s.devices.get(device).map(|e| e.from_release)
    }

    /// After a restart: re-issue SetRelease for the devices in flight
    /// (Updating or Ready: the target; RollingBack: the previous release).
    /// Setting a desired release is idempotent, so this runs nothing twice.
    pub fn resume_effects(&self, _now_ms: u64) -> Vec<Effect> {
        if self.s.phase.is_final() {
            return Vec::new();
        }
        let mut in_flight: Vec<&DeviceId> = self.deadlines.iter().map(|(_, d)| d).collect();
        in_flight.sort();
        in_flight
            .into_iter()
            .filter_map(|d| {
                let e = &self.s.devices[d];
                let release = match e.progress {
                    DeviceProgress::Updating { .. } | DeviceProgress::Ready { .. } => {
                        self.s.spec.to_release
                    }
                    DeviceProgress::RollingBack { .. } => e.from_release,
                    _ => return None,
                };
                Some(Effect::SetRelease {
                    device: d.clone(),
                    release,
                })
            })
            .collect()
    }

    pub fn device(&self, device: &DeviceId) -> Option<&DeviceProgress> {
        self.s.devices.get(device).map(|e| &e.progress)
    }

    /// Why a device last failed in this rollout, also after a rollback.
    pub fn failure_of(&self, device: &DeviceId) -> Option<&str> {
        self.s
            .devices
            .get(device)
            .and_then(|e| e.failure.as_deref())
    }

    /// Every device: its batch and progress, by device id.
    pub fn devices(&self) -> impl Iterator<Item = (&DeviceId, usize, &DeviceProgress)> {
        self.s
            .devices
            .iter()
            .map(|(d, e)| (d, e.batch, &e.progress))
    }

    pub fn summary(&self) -> Progress {
        let total: usize = self.s.counts.iter().map(BatchCounts::eligible).sum();
        let updated: usize = self.s.counts.iter().map(|c| c.updated).sum();
        Progress {
            phase: self.s.phase,
            current_batch: self.s.current,
            batches: self.s.counts.clone(),
            percent: (updated * 100).checked_div(total).map_or(100, |p| p as u8),
        }
    }
}

impl From<FailurePolicy> for contract::OnFailure {
    fn from(p: FailurePolicy) -> Self {
        match p {
            FailurePolicy::Rollback => contract::OnFailure::Rollback,
            FailurePolicy::Pause => contract::OnFailure::Pause,
            FailurePolicy::Continue => contract::OnFailure::Continue,
        }
    }
}

impl From<contract::OnFailure> for FailurePolicy {
    fn from(p: contract::OnFailure) -> Self {
        match p {
            contract::OnFailure::Rollback => FailurePolicy::Rollback,
            contract::OnFailure::Pause => FailurePolicy::Pause,
            contract::OnFailure::Continue => FailurePolicy::Continue,
        }
    }
}

impl From<Phase> for contract::RolloutPhase {
    fn from(p: Phase) -> Self {
        use contract::RolloutPhase as C;
        match p {
            Phase::Running => C::Running,
            Phase::WaitingApproval => C::WaitingApproval,
            Phase::Paused => C::Paused,
            Phase::RollingBack => C::RollingBack,
            Phase::Succeeded => C::Succeeded,
            Phase::Failed => C::Failed,
            Phase::RolledBack => C::RolledBack,
            Phase::Aborted => C::Aborted,
            Phase::Superseded => C::Superseded,
        }
    }
}

impl From<&DeviceProgress> for contract::RolloutDeviceState {
    fn from(p: &DeviceProgress) -> Self {
        use contract::RolloutDeviceState as C;
        match p {
            DeviceProgress::Pending => C::Pending,
            DeviceProgress::Updating { .. } => C::Updating,
            DeviceProgress::Ready { .. } => C::Ready,
            DeviceProgress::Updated => C::Updated,
            DeviceProgress::Failed { .. } => C::Failed,
            DeviceProgress::RollingBack { .. } => C::RollingBack,
            DeviceProgress::RolledBack => C::RolledBack,
            DeviceProgress::Skipped => C::Skipped,
        }
    }
}

impl From<&BatchCounts> for contract::RolloutCounts {
    fn from(c: &BatchCounts) -> Self {
        contract::RolloutCounts {
            total: c.total,
            pending: c.pending,
            updating: c.updating,
            updated: c.updated,
            failed: c.failed,
            skipped: c.skipped,
            rolling_back: c.rolling_back,
            rolled_back: c.rolled_back,
        }
    }
}

impl From<&Rollout> for contract::Rollout {
    fn from(r: &Rollout) -> Self {
        let p = r.summary();
        let batches: Vec<contract::RolloutCounts> = p
            .batches
            .iter()
            .map(contract::RolloutCounts::from)
            .collect();
        let mut counts = contract::RolloutCounts::default();
        for c in &batches {
            counts.total += c.total;
            counts.pending += c.pending;
            counts.updating += c.updating;
            counts.updated += c.updated;
            counts.failed += c.failed;
            counts.skipped += c.skipped;
            counts.rolling_back += c.rolling_back;
            counts.rolled_back += c.rolled_back;
        }
        contract::Rollout {
            id: r.s.id.clone(),
            app: r.s.spec.app.clone(),
            agent_version: r.s.spec.agent_version.clone(),
            selector: r.s.spec.selector.clone(),
            from_release: r.s.from_release,
            to_release: r.s.spec.to_release,
            phase: p.phase.into(),
            created_at_ms: r.s.created_at_ms,
            author: r.s.spec.author.clone(),
            current_batch: p.current_batch,
            batches,
            counts,
            percent: p.percent,
            on_failure: r.s.spec.on_failure.into(),
            approval: r.s.spec.approval,
            updated_at_ms: r.s.updated_at_ms,
            finished_at_ms: r.s.finished_at_ms,
            reason: r.s.reason.clone(),
        }
    }
}

/// The REST view of one device of a rollout.
pub fn device_view(device: &DeviceId, batch: usize, p: &DeviceProgress) -> contract::RolloutDevice {
    contract::RolloutDevice {
        device: device.clone(),
        batch,
        state: p.into(),
        reason: match p {
            DeviceProgress::Failed { reason } => Some(reason.clone()),
            _ => None,
        },
    }
}

impl Rollout {
    /// [`device_view`] with the reason a rolled-back (or rolling back)
    /// device failed, when it did.
    pub fn device_view(
        &self,
        device: &DeviceId,
        batch: usize,
        p: &DeviceProgress,
    ) -> contract::RolloutDevice {
        let mut v = device_view(device, batch, p);
        if v.reason.is_none() {
            v.reason = self
                .failure_of(device)
                .map(|r| format!("failed before the rollback: {r}"));
        }
        v
    }
}

#[cfg(test)]
mod tests;
