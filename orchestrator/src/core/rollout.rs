//! The rollout state machine (issue 13): a release reaches a fleet batch by
//! batch. Pure: time comes in as `now_ms`, the result is a list of
//! [`Effect`]s for the engine to carry out. Serialisable so the engine can
//! persist it and resume it after a restart ([`Rollout::resume_effects`]).
//!
//! Batches are per batch (like FlightCtl): `[Count(1), Percent(50)]` means
//! one device, then half the targets, then the last batch takes the rest.
//! An empty list is one batch of everything. Device ids are sorted, so the
//! batches are deterministic.
//!
//! Counters are kept per batch so `observe` is O(log n).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A batch size: a device count or a percentage of all targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchSize {
    Count(u32),
    Percent(u8),
}

impl BatchSize {
    fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Count(n) => n as usize,
            BatchSize::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

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
    pub app: String,
    /// Display only; the engine resolves it to devices.
    pub selector: String,
    pub to_release: u64,
    pub batches: Vec<BatchSize>,
    /// At most this many devices Updating at once within the running batch.
    pub max_unavailable: Option<BatchSize>,
    pub success_threshold_percent: u8,
    pub on_failure: FailurePolicy,
    pub device_timeout_ms: u64,
    pub min_ready_ms: u64,
    /// Wait for [`Rollout::approve`] between batches.
    pub approval: bool,
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

impl RolloutSpec {
    pub fn validate(&self) -> Result<(), RolloutError> {
        if self.app.is_empty() {
            return Err(field("app", "must not be empty"));
        }
        if self.to_release == 0 {
            return Err(field("to_release", "must be at least 1"));
        }
        for (i, b) in self.batches.iter().enumerate() {
            match b {
                BatchSize::Count(0) => {
                    return Err(field(&format!("batches[{i}]"), "must be at least 1"))
                }
                BatchSize::Percent(p) if *p == 0 || *p > 100 => {
                    return Err(field(&format!("batches[{i}]"), "percent must be 1..=100"))
                }
                _ => {}
            }
        }
        match self.max_unavailable {
            Some(BatchSize::Count(0)) | Some(BatchSize::Percent(0)) => {
                return Err(field("max_unavailable", "must be at least 1"))
            }
            Some(BatchSize::Percent(p)) if p > 100 => {
                return Err(field("max_unavailable", "percent must be 1..=100"))
            }
            _ => {}
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
    /// Finished with failures under `FailurePolicy::Continue`.
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
    pub release: u64,
    pub ready: bool,
    pub failed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Set the app's desired release on a device; 0 = remove the app.
    SetRelease {
        device: String,
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
}

/// Progress per batch and overall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub current_batch: usize,
    pub batches: Vec<BatchCounts>,
    pub percent: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub created_at_ms: u64,
    pub phase: Phase,
    /// Phase to return to on resume after an operator pause.
    paused_from: Option<Phase>,
    batches: Vec<Vec<String>>,
    devices: BTreeMap<String, DeviceEntry>,
    current: usize,
    counts: Vec<BatchCounts>,
    rolling_back: usize,
}

fn bucket(p: &DeviceProgress) -> u8 {
    match p {
        DeviceProgress::Pending => 0,
        DeviceProgress::Updating { .. } | DeviceProgress::Ready { .. } => 1,
        DeviceProgress::Updated => 2,
        DeviceProgress::Failed { .. } => 3,
        DeviceProgress::Skipped => 4,
        DeviceProgress::RollingBack { .. } | DeviceProgress::RolledBack => 5,
    }
}

fn adjust(c: &mut BatchCounts, b: u8, add: bool) {
    let slot = match b {
        0 => &mut c.pending,
        1 => &mut c.updating,
        2 => &mut c.updated,
        3 => &mut c.failed,
        4 => &mut c.skipped,
        _ => return,
    };
    if add {
        *slot += 1
    } else {
        *slot -= 1
    }
}

impl Rollout {
    /// Creates a rollout over `targets` (device id → current release, 0 =
    /// app absent) and starts the first batch.
    pub fn new(
        id: String,
        spec: RolloutSpec,
        targets: BTreeMap<String, u64>,
        now_ms: u64,
    ) -> Result<(Self, Vec<Effect>), RolloutError> {
        spec.validate()?;
        if targets.is_empty() {
            return Err(field("selector", "matches no device"));
        }
        let ids: Vec<String> = targets.keys().cloned().collect();
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
                    },
                );
            }
        }
        let mut r = Rollout {
            id,
            spec,
            created_at_ms: now_ms,
            phase: Phase::Running,
            paused_from: None,
            batches,
            devices,
            current: 0,
            counts,
            rolling_back: 0,
        };
        let mut fx = vec![Effect::Changed];
        r.advance(now_ms, &mut fx);
        Ok((r, fx))
    }

    fn set(&mut self, device: &str, p: DeviceProgress) {
        let e = self.devices.get_mut(device).expect("known device");
        let c = &mut self.counts[e.batch];
        adjust(c, bucket(&e.progress), false);
        adjust(c, bucket(&p), true);
        let was_rb = matches!(e.progress, DeviceProgress::RollingBack { .. });
        let is_rb = matches!(p, DeviceProgress::RollingBack { .. });
        if was_rb && !is_rb {
            self.rolling_back -= 1;
        }
        if !was_rb && is_rb {
            self.rolling_back += 1;
        }
        e.progress = p;
    }

    fn max_updating(&self) -> usize {
        match self.spec.max_unavailable {
            None => usize::MAX,
            Some(b) => b.of(self.devices.len()).max(1),
        }
    }

    fn threshold_met(&self, b: usize) -> bool {
        let c = &self.counts[b];
        let eligible = c.total - c.skipped;
        c.updated * 100 >= eligible * self.spec.success_threshold_percent as usize
    }

    fn threshold_unreachable(&self, b: usize) -> bool {
        let c = &self.counts[b];
        let eligible = c.total - c.skipped;
        (eligible - c.failed) * 100 < eligible * self.spec.success_threshold_percent as usize
    }

    /// Starts Pending devices in the running batch, moves to the next batch
    /// or finishes. Cost: O(devices started), plus O(batch) when a batch ends.
    fn advance(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        loop {
            if self.phase != Phase::Running {
                return;
            }
            let b = self.current;
            if self.threshold_unreachable(b) {
                match self.spec.on_failure {
                    FailurePolicy::Rollback => return self.start_rollback(now_ms, fx),
                    FailurePolicy::Pause => {
                        self.phase = Phase::Paused;
                        self.paused_from = Some(Phase::Running);
                        return;
                    }
                    FailurePolicy::Continue => {}
                }
            }
            // start pending devices up to max_unavailable
            let room = self.max_updating().saturating_sub(self.counts[b].updating);
            if room > 0 && self.counts[b].pending > 0 {
                let start: Vec<String> = self.batches[b]
                    .iter()
                    .filter(|d| self.devices[*d].progress == DeviceProgress::Pending)
                    .take(room)
                    .cloned()
                    .collect();
                for d in start {
                    self.set(&d, DeviceProgress::Updating { since_ms: now_ms });
                    let e = self.devices.get_mut(&d).unwrap();
                    e.touched = true;
                    fx.push(Effect::SetRelease {
                        device: d,
                        release: self.spec.to_release,
                    });
                }
            }
            let c = &self.counts[b];
            if c.pending > 0 || c.updating > 0 {
                return;
            }
            // batch done
            if !self.threshold_met(b) && self.spec.on_failure != FailurePolicy::Continue {
                return; // handled above; unreachable in practice
            }
            if b + 1 == self.batches.len() {
                let any_failed = self.counts.iter().any(|c| c.failed > 0);
                self.finish(
                    if any_failed {
                        Phase::Failed
                    } else {
                        Phase::Succeeded
                    },
                    fx,
                );
                return;
            }
            self.current += 1;
            if self.spec.approval {
                self.phase = Phase::WaitingApproval;
                return;
            }
        }
    }

    fn finish(&mut self, phase: Phase, fx: &mut Vec<Effect>) {
        self.phase = phase;
        fx.push(Effect::Finished(phase));
    }

    fn start_rollback(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        self.phase = Phase::RollingBack;
        let touched: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, e)| e.touched)
            .map(|(d, _)| d.clone())
            .collect();
        for d in touched {
            let e = &self.devices[&d];
            if matches!(
                e.progress,
                DeviceProgress::Skipped | DeviceProgress::RolledBack
            ) {
                continue;
            }
            let from = e.from_release;
            self.set(&d, DeviceProgress::RollingBack { since_ms: now_ms });
            fx.push(Effect::SetRelease {
                device: d,
                release: from,
            });
        }
        if self.rolling_back == 0 {
            self.finish(Phase::RolledBack, fx);
        }
    }

    fn with_changed(mut fx: Vec<Effect>) -> Vec<Effect> {
        if !fx.is_empty() && !fx.contains(&Effect::Changed) {
            fx.insert(0, Effect::Changed);
        }
        fx
    }

    /// A device reported its state. Idempotent: the same observation twice
    /// yields no effects the second time.
    pub fn observe(&mut self, device: &str, obs: Observation, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(e) = self.devices.get(device) else {
            return fx;
        };
        if self.phase.is_final() {
            return fx;
        }
        let to = self.spec.to_release;
        let from = e.from_release;
        let before = e.progress.clone();
        let next = match &e.progress {
            DeviceProgress::Updating { since_ms }
            | DeviceProgress::Ready {
                updating_since_ms: since_ms,
                ..
            } => {
                let since = *since_ms;
                if let Some(reason) = obs.failed.filter(|_| obs.release == to) {
                    Some(DeviceProgress::Failed { reason })
                } else if obs.release == to && obs.ready {
                    match &e.progress {
                        DeviceProgress::Ready { .. } => None,
                        _ => Some(DeviceProgress::Ready {
                            since_ms: now_ms,
                            updating_since_ms: since,
                        }),
                    }
                } else if matches!(e.progress, DeviceProgress::Ready { .. }) {
                    Some(DeviceProgress::Updating { since_ms: since })
                } else {
                    None
                }
            }
            DeviceProgress::RollingBack { .. } if obs.release == from => {
                Some(DeviceProgress::RolledBack)
            }
            _ => None,
        };
        if let Some(p) = next {
            if p != before {
                self.set(device, p);
                fx.push(Effect::Changed);
            }
        }
        self.check(now_ms, &mut fx);
        Self::with_changed(fx)
    }

    /// min_ready with zero wait, batch progression, rollback completion.
    fn check(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.phase == Phase::RollingBack && self.rolling_back == 0 {
            self.finish(Phase::RolledBack, fx);
            return;
        }
        if self.phase == Phase::Running && self.spec.min_ready_ms == 0 {
            self.promote_ready(now_ms, fx);
        }
        let n = fx.len();
        self.advance(now_ms, fx);
        if fx.len() != n || self.phase != Phase::Running {
            // phase changes are covered by Changed added by with_changed
        }
    }

    fn promote_ready(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let b = self.current;
        let ready: Vec<String> = self.batches[b]
            .iter()
            .filter(|d| matches!(self.devices[*d].progress, DeviceProgress::Ready { since_ms, .. } if now_ms >= since_ms + self.spec.min_ready_ms))
            .cloned()
            .collect();
        for d in ready {
            self.set(&d, DeviceProgress::Updated);
            fx.push(Effect::Changed);
        }
    }

    /// Timeouts and min-ready. Call at [`Rollout::next_deadline`].
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        match self.phase {
            Phase::Running | Phase::Paused | Phase::WaitingApproval => {
                let b = self.current;
                let t = self.spec.device_timeout_ms;
                for d in self.batches[b].clone() {
                    match self.devices[&d].progress {
                        DeviceProgress::Updating { since_ms } if now_ms >= since_ms + t => {
                            self.set(
                                &d,
                                DeviceProgress::Failed {
                                    reason: "timed out".into(),
                                },
                            );
                            fx.push(Effect::Changed);
                        }
                        DeviceProgress::Ready { since_ms, .. }
                            if now_ms >= since_ms + self.spec.min_ready_ms =>
                        {
                            self.set(&d, DeviceProgress::Updated);
                            fx.push(Effect::Changed);
                        }
                        _ => {}
                    }
                }
                self.advance(now_ms, &mut fx);
            }
            Phase::RollingBack => {
                let t = self.spec.device_timeout_ms;
                let late: Vec<String> = self
                    .devices
                    .iter()
                    .filter(|(_, e)| matches!(e.progress, DeviceProgress::RollingBack { since_ms } if now_ms >= since_ms + t))
                    .map(|(d, _)| d.clone())
                    .collect();
                for d in late {
                    self.set(
                        &d,
                        DeviceProgress::Failed {
                            reason: "rollback timed out".into(),
                        },
                    );
                    fx.push(Effect::Changed);
                }
                if self.rolling_back == 0 {
                    self.finish(Phase::RolledBack, &mut fx);
                }
            }
            _ => {}
        }
        Self::with_changed(fx)
    }

    /// When `tick` must next be called, if ever. O(devices in the batch).
    pub fn next_deadline(&self) -> Option<u64> {
        let t = self.spec.device_timeout_ms;
        let m = self.spec.min_ready_ms;
        let iter: Box<dyn Iterator<Item = &DeviceEntry>> = match self.phase {
            Phase::RollingBack => Box::new(self.devices.values()),
            Phase::Running | Phase::Paused | Phase::WaitingApproval => {
                Box::new(self.batches[self.current].iter().map(|d| &self.devices[d]))
            }
            _ => return None,
        };
        iter.filter_map(|e| match e.progress {
            DeviceProgress::Updating { since_ms } | DeviceProgress::RollingBack { since_ms } => {
                Some(since_ms + t)
            }
            DeviceProgress::Ready {
                since_ms,
                updating_since_ms,
            } => Some((since_ms + m).min(updating_since_ms + t)),
            _ => None,
        })
        .min()
    }

    /// The device was deleted or left the selector: it is skipped.
    pub fn device_gone(&mut self, device: &str, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.phase.is_final() || !self.devices.contains_key(device) {
            return fx;
        }
        if self.devices[device].progress == DeviceProgress::Skipped {
            return fx;
        }
        self.set(device, DeviceProgress::Skipped);
        fx.push(Effect::Changed);
        self.check(now_ms, &mut fx);
        Self::with_changed(fx)
    }

    fn invalid(&self, action: &'static str) -> RolloutError {
        RolloutError::InvalidTransition {
            action,
            phase: self.phase,
        }
    }

    pub fn pause(&mut self, _now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        match self.phase {
            Phase::Running | Phase::WaitingApproval => {
                self.paused_from = Some(self.phase);
                self.phase = Phase::Paused;
                Ok(vec![Effect::Changed])
            }
            _ => Err(self.invalid("pause")),
        }
    }

    pub fn resume(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.phase != Phase::Paused {
            return Err(self.invalid("resume"));
        }
        self.phase = self.paused_from.take().unwrap_or(Phase::Running);
        let mut fx = vec![Effect::Changed];
        if self.phase == Phase::Running && self.threshold_unreachable(self.current) {
            // resumed after a failure pause: go on like Continue
            let saved = self.spec.on_failure;
            self.spec.on_failure = FailurePolicy::Continue;
            self.advance(now_ms, &mut fx);
            self.spec.on_failure = saved;
        } else {
            self.advance(now_ms, &mut fx);
        }
        Ok(fx)
    }

    pub fn approve(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.phase != Phase::WaitingApproval {
            return Err(self.invalid("approve"));
        }
        self.phase = Phase::Running;
        let mut fx = vec![Effect::Changed];
        self.advance(now_ms, &mut fx);
        Ok(fx)
    }

    /// Stops without rollback; devices keep what they run.
    pub fn abort(&mut self, _now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.phase.is_final() {
            return Err(self.invalid("abort"));
        }
        let mut fx = vec![Effect::Changed];
        self.finish(Phase::Aborted, &mut fx);
        Ok(fx)
    }

    pub fn rollback(&mut self, now_ms: u64) -> Result<Vec<Effect>, RolloutError> {
        if self.phase.is_final() || self.phase == Phase::RollingBack {
            return Err(self.invalid("roll back"));
        }
        let mut fx = vec![Effect::Changed];
        self.start_rollback(now_ms, &mut fx);
        Ok(fx)
    }

    /// A newer rollout of the same app took over: ends without rollback.
    pub fn supersede(&mut self, _now_ms: u64) -> Vec<Effect> {
        if self.phase.is_final() {
            return Vec::new();
        }
        let mut fx = vec![Effect::Changed];
        self.finish(Phase::Superseded, &mut fx);
        fx
    }

    /// After a restart: re-issue SetRelease for devices in flight.
    pub fn resume_effects(&self, _now_ms: u64) -> Vec<Effect> {
        if self.phase.is_final() {
            return Vec::new();
        }
        self.devices
            .iter()
            .filter_map(|(d, e)| match e.progress {
                DeviceProgress::Updating { .. } | DeviceProgress::Ready { .. } => {
                    Some(Effect::SetRelease {
                        device: d.clone(),
                        release: self.spec.to_release,
                    })
                }
                DeviceProgress::RollingBack { .. } => Some(Effect::SetRelease {
                    device: d.clone(),
                    release: e.from_release,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn device(&self, device: &str) -> Option<&DeviceProgress> {
        self.devices.get(device).map(|e| &e.progress)
    }

    pub fn summary(&self) -> Progress {
        let total: usize = self.counts.iter().map(|c| c.total - c.skipped).sum();
        let updated: usize = self.counts.iter().map(|c| c.updated).sum();
        Progress {
            phase: self.phase,
            current_batch: self.current,
            batches: self.counts.clone(),
            percent: if total == 0 {
                100
            } else {
                (updated * 100 / total) as u8
            },
        }
    }
}

#[cfg(test)]
mod tests;
