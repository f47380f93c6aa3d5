//! Edge jobs (issue 16), pure: a run-to-completion container sent to the
//! devices a selector matched when the job was created.
//!
//! Per device: `pending` → `dispatched` (sent) → `running` (the device
//! says its container started) → `succeeded` | `failed` | `timed_out` |
//! `cancelled`; `pending` → `expired` when it was never sent before the
//! job's expiry (offline all along). A device dispatched or running past
//! the job's timeout plus [`ANSWER_GRACE`] with no final answer is
//! `timed_out` (the device's own timeout answers first when it can).
//!
//! - [`Job::dispatch`] sends to pending online devices, at most
//!   `concurrency` dispatched or running at once; offline ones wait.
//! - [`Job::resend`]: a device that reconnects while dispatched or running
//!   is sent the job again (the agent answers a known id with its report).
//! - [`Job::report`] takes a device's report; one for a device already
//!   final is ignored (agents re-send final reports on every reconnect).
//! - [`Job::cancel`]: pending devices are `cancelled` at once, the ones
//!   dispatched or running are told to stop (their `cancelled` answer
//!   follows).
//!
//! The job's phase: `running` until every device is final, then
//! `succeeded` if all succeeded, else `failed`; `cancelled` from the
//! cancel on.

use std::collections::BTreeMap;

use drover_shared::job::{JobPhase as DevicePhase, JobReport, JobSpec, OUTPUT_TAIL_BYTES};
use drover_shared::DeviceId;
use serde::{Deserialize, Serialize};

use crate::contract::{self, JobCounts, JobDeviceState as State, JobPhase};

/// How long past its timeout a device may stay silent before the job
/// counts it timed out: room for a pull and a slow link.
pub const ANSWER_GRACE_MS: u64 = 120_000;
/// The default time to get a job to every device.
pub const DEFAULT_EXPIRY_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRun {
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub output_tail: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub dispatched_ms: u64,
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub finished_ms: u64,
}

impl DeviceRun {
    fn pending() -> DeviceRun {
        DeviceRun {
            state: State::Pending,
            exit_code: None,
            output_tail: String::new(),
            error: String::new(),
            dispatched_ms: 0,
            started_ms: 0,
            finished_ms: 0,
        }
    }

    fn in_flight(&self) -> bool {
        matches!(self.state, State::Dispatched | State::Running)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub field: &'static str,
    pub message: String,
}

/// One job and where it is on each device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub spec: JobSpec,
    pub selector: String,
    pub concurrency: usize,
    pub created_by: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub phase: JobPhase,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// When anything in it last changed.
    #[serde(default)]
    pub updated_ms: u64,
    pub devices: BTreeMap<DeviceId, DeviceRun>,
}

impl Job {
    /// A job for `targets` (the devices its selector matched);
    /// `concurrency` `None`: all at once. The spec is validated here.
    pub fn new(
        mut spec: JobSpec,
        selector: String,
        concurrency: Option<usize>,
        created_by: String,
        now: u64,
        expires_ms: u64,
        targets: Vec<DeviceId>,
    ) -> Result<Job, JobError> {
        spec.validate().map_err(|e| JobError {
            field: match e.field.split(['.', '[']).next().unwrap_or("") {
                "id" => "id",
                "image" => "image",
                "env" => "env",
                "timeout" => "timeout_secs",
                _ => "command",
            },
            message: if e.field.contains(['.', '[']) {
                format!("{}: {}", e.field, e.message)
            } else {
                e.message
            },
        })?;
        if concurrency == Some(0) {
            return Err(JobError {
                field: "concurrency",
                message: "must be at least 1 (absent: every device at once)".into(),
            });
        }
        if targets.is_empty() {
            return Err(JobError {
                field: "selector",
                message: format!("selector {selector:?} matches no device"),
            });
        }
        let concurrency = concurrency.unwrap_or(targets.len()).min(targets.len());
        Ok(Job {
            spec,
            selector,
            concurrency,
            created_by,
            created_ms: now,
            expires_ms,
            phase: JobPhase::Running,
            finished_ms: None,
            updated_ms: now,
            devices: targets
                .into_iter()
                .map(|d| (d, DeviceRun::pending()))
                .collect(),
        })
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Sends the job to pending devices that are online, while fewer than
    /// `concurrency` are dispatched or running.
    pub fn dispatch(&mut self, now: u64, online: impl Fn(&DeviceId) -> bool) -> Vec<DeviceId> {
        if self.phase != JobPhase::Running {
            return Vec::new();
        }
        let mut in_flight = self.devices.values().filter(|r| r.in_flight()).count();
        let mut out = Vec::new();
        for (id, run) in &mut self.devices {
            if in_flight >= self.concurrency {
                break;
            }
            if run.state == State::Pending && online(id) {
                run.state = State::Dispatched;
                run.dispatched_ms = now;
                in_flight += 1;
                out.push(id.clone());
            }
        }
        if !out.is_empty() {
            self.updated_ms = now;
        }
        out
    }

    /// Whether `device`, back online, must be sent the job again.
    pub fn resend(&mut self, device: &DeviceId, now: u64) -> bool {
        match self.devices.get_mut(device) {
            Some(run) if run.state == State::Dispatched => {
                run.dispatched_ms = now;
                self.updated_ms = now;
                true
            }
            Some(run) => run.state == State::Running,
            None => false,
        }
    }

    /// A device's report; whether anything changed.
    pub fn report(&mut self, device: &DeviceId, r: &JobReport, now: u64) -> bool {
        let Some(run) = self.devices.get_mut(device) else {
            return false;
        };
        if !run.in_flight() || r.id != self.spec.id {
            return false;
        }
        let state = match r.phase {
            DevicePhase::Accepted | DevicePhase::Pulling => return false,
            DevicePhase::Running => State::Running,
            DevicePhase::Succeeded => State::Succeeded,
            DevicePhase::Failed => State::Failed,
            DevicePhase::TimedOut => State::TimedOut,
            DevicePhase::Cancelled => State::Cancelled,
        };
        if state == run.state && state == State::Running && run.started_ms == r.started_at_ms {
            return false;
        }
        run.state = state;
        run.started_ms = r.started_at_ms;
        if state.is_final() {
            run.exit_code = r.exit_code;
            run.output_tail = drover_shared::job::tail(r.output_tail.as_bytes(), OUTPUT_TAIL_BYTES);
            run.error = r.error.chars().take(1024).collect();
            run.finished_ms = if r.finished_at_ms > 0 {
                r.finished_at_ms
            } else {
                now
            };
        }
        self.updated_ms = now;
        self.settle(now);
        true
    }

    /// Deadlines: devices silent past the timeout, pending ones past the
    /// expiry. Whether anything changed.
    pub fn tick(&mut self, now: u64) -> bool {
        let mut changed = false;
        let timeout = self.spec.timeout_ms;
        for run in self.devices.values_mut() {
            if run.in_flight()
                && now
                    >= run
                        .dispatched_ms
                        .saturating_add(timeout)
                        .saturating_add(ANSWER_GRACE_MS)
            {
                run.state = State::TimedOut;
                run.error = "no answer from the device within the timeout".into();
                run.finished_ms = now;
                changed = true;
            } else if run.state == State::Pending && now >= self.expires_ms {
                run.state = State::Expired;
                run.error = "not sent before the job expired (device offline)".into();
                run.finished_ms = now;
                changed = true;
            }
        }
        if changed {
            self.updated_ms = now;
            self.settle(now);
        }
        changed
    }

    /// Cancels: pending devices at once; the devices to tell to stop.
    pub fn cancel(&mut self, now: u64) -> Vec<DeviceId> {
        if self.phase.is_final() {
            return Vec::new();
        }
        let mut stop = Vec::new();
        for (id, run) in &mut self.devices {
            match run.state {
                State::Pending => {
                    run.state = State::Cancelled;
                    run.finished_ms = now;
                }
                State::Dispatched | State::Running => stop.push(id.clone()),
                _ => {}
            }
        }
        self.phase = JobPhase::Cancelled;
        self.finished_ms = Some(now);
        self.updated_ms = now;
        stop
    }

    fn settle(&mut self, now: u64) {
        if self.phase != JobPhase::Running {
            return;
        }
        if self.devices.values().all(|r| r.state.is_final()) {
            self.phase = if self.devices.values().all(|r| r.state == State::Succeeded) {
                JobPhase::Succeeded
            } else {
                JobPhase::Failed
            };
            self.finished_ms = Some(now);
        }
    }

    pub fn counts(&self) -> JobCounts {
        let mut c = JobCounts {
            total: self.devices.len(),
            ..JobCounts::default()
        };
        for r in self.devices.values() {
            *match r.state {
                State::Pending => &mut c.pending,
                State::Dispatched => &mut c.dispatched,
                State::Running => &mut c.running,
                State::Succeeded => &mut c.succeeded,
                State::Failed => &mut c.failed,
                State::TimedOut => &mut c.timed_out,
                State::Cancelled => &mut c.cancelled,
                State::Expired => &mut c.expired,
            } += 1;
        }
        c
    }

    /// The REST view; per device only `with_devices`.
    pub fn view(&self, with_devices: bool) -> contract::Job {
        contract::Job {
            id: self.spec.id.clone(),
            selector: self.selector.clone(),
            image: self.spec.image.clone(),
            command: self.spec.command.clone(),
            env_names: self.spec.env.keys().cloned().collect(),
            timeout_secs: self.spec.timeout_ms / 1000,
            concurrency: self.concurrency,
            phase: self.phase,
            created_by: self.created_by.clone(),
            created_at_ms: self.created_ms,
            expires_at_ms: self.expires_ms,
            finished_at_ms: self.finished_ms,
            updated_at_ms: self.updated_ms,
            counts: self.counts(),
            devices: if with_devices {
                self.devices
                    .iter()
                    .map(|(d, r)| contract::JobDevice {
                        device: d.clone(),
                        state: r.state,
                        exit_code: r.exit_code,
                        output_tail: r.output_tail.clone(),
                        error: r.error.clone(),
                        dispatched_at_ms: r.dispatched_ms,
                        started_at_ms: r.started_ms,
                        finished_at_ms: r.finished_ms,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }

    fn spec() -> JobSpec {
        JobSpec {
            id: "j1".into(),
            image: "busybox:1".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            timeout_ms: 10_000,
        }
    }

    fn job(concurrency: Option<usize>, targets: &[&str]) -> Job {
        Job::new(
            spec(),
            "env=a".into(),
            concurrency,
            "ops".into(),
            1000,
            1000 + DEFAULT_EXPIRY_MS,
            targets.iter().map(|t| id(t)).collect(),
        )
        .expect("job")
    }

    fn done(phase: DevicePhase, exit: Option<i64>) -> JobReport {
        JobReport {
            id: "j1".into(),
            phase,
            exit_code: exit,
            output_tail: "out".into(),
            error: String::new(),
            started_at_ms: 1100,
            finished_at_ms: 1200,
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = |c: Option<usize>, t: Vec<DeviceId>, f: fn(&mut JobSpec)| {
            let mut s = spec();
            f(&mut s);
            Job::new(s, String::new(), c, "x".into(), 0, 1, t).expect_err("refused")
        };
        assert_eq!(e(Some(1), vec![], |_| {}).field, "selector");
        assert_eq!(e(Some(0), vec![id("a")], |_| {}).field, "concurrency");
        assert_eq!(
            e(None, vec![id("a")], |s| s.timeout_ms = 0).field,
            "timeout_secs"
        );
        assert_eq!(
            e(None, vec![id("a")], |s| s.image = "BAD ref".into()).field,
            "image"
        );
        let env = e(None, vec![id("a")], |s| {
            s.env.insert("A=B".into(), "v".into());
        });
        assert_eq!(env.field, "env");
        assert!(env.message.contains("A=B"), "{}", env.message);
    }

    #[test]
    fn concurrency_bounds_the_devices_in_flight_and_offline_ones_wait() {
        let mut j = job(Some(1), &["a", "b", "c"]);
        assert_eq!(j.dispatch(1, |d| d.as_str() != "a"), vec![id("b")]);
        assert!(j.dispatch(2, |_| true).is_empty(), "one in flight already");
        assert!(j.report(&id("b"), &done(DevicePhase::Running, None), 3));
        assert!(j.report(&id("b"), &done(DevicePhase::Succeeded, Some(0)), 4));
        assert_eq!(j.dispatch(5, |d| d.as_str() != "a"), vec![id("c")]);
        assert!(j.report(&id("c"), &done(DevicePhase::Succeeded, Some(0)), 6));
        assert_eq!(j.phase, JobPhase::Running, "a is still pending");
        assert!(j.dispatch(7, |d| d.as_str() != "a").is_empty());
        assert_eq!(j.dispatch(8, |_| true), vec![id("a")]);
        assert!(j.report(&id("a"), &done(DevicePhase::Succeeded, Some(0)), 9));
        assert_eq!(j.phase, JobPhase::Succeeded);
        assert_eq!(j.finished_ms, Some(9));
        let c = j.counts();
        assert_eq!((c.total, c.succeeded), (3, 3));
    }

    #[test]
    fn a_failure_fails_the_job_and_late_repeats_change_nothing() {
        let mut j = job(None, &["a", "b"]);
        assert_eq!(j.dispatch(1, |_| true).len(), 2);
        assert!(j.report(&id("a"), &done(DevicePhase::Failed, Some(3)), 2));
        assert!(j.report(&id("b"), &done(DevicePhase::Succeeded, Some(0)), 3));
        assert_eq!(j.phase, JobPhase::Failed);
        let before = j.clone();
        assert!(!j.report(&id("a"), &done(DevicePhase::Succeeded, Some(0)), 4));
        assert!(!j.report(&id("z"), &done(DevicePhase::Succeeded, Some(0)), 4));
        assert_eq!(j, before);
        assert_eq!(j.devices[&id("a")].exit_code, Some(3));
        assert_eq!(j.devices[&id("a")].output_tail, "out");
    }

    #[test]
    fn silence_times_out_and_never_sent_expires() {
        let mut j = job(Some(1), &["a", "b"]);
        assert_eq!(j.dispatch(1000, |d| d.as_str() == "a"), vec![id("a")]);
        let deadline = 1000 + 10_000 + ANSWER_GRACE_MS;
        assert!(!j.tick(deadline - 1));
        assert!(j.tick(deadline));
        assert_eq!(j.devices[&id("a")].state, State::TimedOut);
        assert!(j.tick(j.expires_ms));
        assert_eq!(j.devices[&id("b")].state, State::Expired);
        assert_eq!(j.phase, JobPhase::Failed);
    }

    #[test]
    fn a_reconnecting_device_is_sent_it_again_until_it_answers() {
        let mut j = job(None, &["a"]);
        j.dispatch(1, |_| true);
        assert!(j.resend(&id("a"), 50));
        assert_eq!(j.devices[&id("a")].dispatched_ms, 50);
        j.report(&id("a"), &done(DevicePhase::Running, None), 60);
        assert!(j.resend(&id("a"), 70));
        j.report(&id("a"), &done(DevicePhase::Succeeded, Some(0)), 80);
        assert!(!j.resend(&id("a"), 90));
        assert!(!j.resend(&id("b"), 90));
    }

    #[test]
    fn cancel_stops_the_running_and_drops_the_pending() {
        let mut j = job(Some(1), &["a", "b"]);
        j.dispatch(1, |_| true);
        assert_eq!(j.cancel(5), vec![id("a")]);
        assert_eq!(j.phase, JobPhase::Cancelled);
        assert_eq!(j.devices[&id("b")].state, State::Cancelled);
        assert!(j.dispatch(6, |_| true).is_empty());
        assert!(j.report(&id("a"), &done(DevicePhase::Cancelled, Some(137)), 7));
        assert_eq!(j.devices[&id("a")].state, State::Cancelled);
        assert_eq!(j.phase, JobPhase::Cancelled);
        assert!(j.cancel(8).is_empty());
    }

    #[test]
    fn it_survives_its_json() {
        let mut j = job(Some(1), &["a", "b"]);
        j.dispatch(1, |_| true);
        let back: Job =
            serde_json::from_slice(&serde_json::to_vec(&j).expect("json")).expect("back");
        assert_eq!(back, j);
    }
}
