//! Edge jobs in the engine: the pure machine (`core::jobs`) fed by the
//! devices' `job` reports, hellos and a timer; `RunJob` and `CancelJob`
//! go out through the outbox.
//!
//! - **Writes.** A job is stored whole (JSON, table `jobs`) when it is
//!   created or cancelled (replying once durable); device progress only
//!   marks it dirty, and dirty jobs are stored at most once per
//!   [`FLUSH_EVERY`]. After a crash a device that was sent the job may be
//!   `pending` again and is sent it again: the agent answers a known id
//!   with its report instead of running it twice. Finished jobs beyond the
//!   last [`FINISHED_KEPT`] are deleted.
//! - **Announcements.** `Change::Job` (counts, no devices) at once for a
//!   creation, a cancel or a new phase; device progress coalesced to one
//!   per job per tick.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use drover_shared::job::{JobReport, JobSpec};
use drover_shared::payload::{Action, Command as DeviceCommand};
use drover_shared::topic::TopicKind;
use drover_shared::{encode, DeviceId};
use tokio::sync::oneshot;
use tracing::info;

use super::{now_ms, Done, Engine, EngineError, Then};
use crate::contract::{self, Change};
use crate::core::jobs::{Job, DEFAULT_EXPIRY_MS};
use crate::core::selector::Selector;
use crate::store::Write;

/// How often a job's progress is stored, at most.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Finished jobs kept (the oldest go first); running ones always are.
pub const FINISHED_KEPT: usize = 100;

/// The engine's jobs.
#[derive(Default)]
pub struct Jobs {
    jobs: BTreeMap<String, Job>,
    /// Jobs that may still change: running, or with devices in flight.
    active: BTreeSet<String>,
    dirty: BTreeSet<String>,
    unannounced: BTreeSet<String>,
    last_flush: Option<Instant>,
}

impl Jobs {
    pub fn load(list: Vec<Job>) -> Jobs {
        let mut j = Jobs::default();
        for job in list {
            let id = job.id().to_string();
            j.active.insert(id.clone());
            j.jobs.insert(id, job);
        }
        j
    }

    pub fn get(&self, id: &str) -> Option<contract::Job> {
        self.jobs.get(id).map(|j| j.view(true))
    }

    /// Newest first, without devices.
    pub fn list(&self) -> Vec<contract::Job> {
        let mut out: Vec<contract::Job> = self.jobs.values().map(|j| j.view(false)).collect();
        out.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| b.id.cmp(&a.id))
        });
        out
    }
}

fn invalid(field: &str, message: impl Into<String>) -> EngineError {
    EngineError::JobInvalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Engine {
    fn job_command(&self, device: &DeviceId, action: Action) {
        let cmd = DeviceCommand {
            id: uuid::Uuid::new_v4().to_string(),
            issued_at_ms: now_ms(),
            action,
        };
        self.outbox.publish(device, TopicKind::Cmd, encode(&cmd));
    }

    fn send_job(&self, devices: &[DeviceId], spec: &JobSpec) {
        for d in devices {
            self.job_command(d, Action::RunJob(spec.clone()));
        }
    }

    pub(super) async fn create_job(
        &mut self,
        req: contract::CreateJob,
        author: String,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        match self.plan_job(req, author) {
            Ok(job) => {
                let id = job.id().to_string();
                self.jobs.active.insert(id.clone());
                self.jobs.jobs.insert(id.clone(), job.clone());
                info!(job = %id, devices = job.devices.len(), image = %job.spec.image, "job created");
                self.queue(
                    vec![Write::Job(Box::new(job))],
                    Then::Job {
                        reply,
                        id,
                        created: true,
                        stop: Vec::new(),
                    },
                )
                .await;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn plan_job(&self, req: contract::CreateJob, author: String) -> Result<Job, EngineError> {
        let selector = Selector::parse(&req.selector).map_err(|e| {
            invalid(
                "selector",
                format!("selector {:?} is not valid: {e}", req.selector),
            )
        })?;
        if req.timeout_secs == 0 || req.timeout_secs > drover_shared::job::MAX_TIMEOUT_MS / 1000 {
            return Err(invalid(
                "timeout_secs",
                "must be more than 0 and at most 86400 (24 hours)",
            ));
        }
        let expires = match req.expires_secs {
            Some(0) => return Err(invalid("expires_secs", "must be more than 0")),
            Some(s) if s > 30 * 24 * 3600 => {
                return Err(invalid("expires_secs", "must be at most 30 days"))
            }
            Some(s) => s * 1000,
            None => DEFAULT_EXPIRY_MS,
        };
        let targets = self.fleet.matching(&selector);
        let now = now_ms();
        let spec = JobSpec {
            id: uuid::Uuid::new_v4().to_string(),
            image: req.image,
            command: req.command,
            env: req.env,
            timeout_ms: req.timeout_secs * 1000,
        };
        Job::new(
            spec,
            selector.to_string(),
            req.concurrency,
            author,
            now,
            now + expires,
            targets,
        )
        .map_err(|e| {
            if e.field == "selector" {
                EngineError::JobConflict {
                    field: e.field.into(),
                    message: e.message,
                }
            } else {
                invalid(e.field, e.message)
            }
        })
    }

    pub(super) async fn cancel_job(
        &mut self,
        id: String,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        let Some(job) = self.jobs.jobs.get_mut(&id) else {
            let _ = reply.send(Err(EngineError::UnknownJob(id)));
            return;
        };
        if job.phase.is_final() {
            let phase = format!("{:?}", job.phase).to_lowercase();
            let _ = reply.send(Err(EngineError::JobConflict {
                field: "id".into(),
                message: format!("job {id} has already ended ({phase})"),
            }));
            return;
        }
        let stop = job.cancel(now_ms());
        let rec = job.clone();
        info!(job = %id, stopping = stop.len(), "job cancelled");
        self.jobs.dirty.remove(&id);
        self.queue(
            vec![Write::Job(Box::new(rec))],
            Then::Job {
                reply,
                id,
                created: false,
                stop,
            },
        )
        .await;
    }

    /// Once a creation or a cancel is durable: the devices are told, the
    /// change announced, the caller answered.
    pub(super) fn job_durable(
        &mut self,
        reply: oneshot::Sender<Result<Done, EngineError>>,
        id: &str,
        created: bool,
        stop: &[DeviceId],
    ) {
        for d in stop {
            self.job_command(d, Action::CancelJob { id: id.to_string() });
        }
        if created {
            self.dispatch_job(id);
        }
        self.announce_job(id);
        let view = self.jobs.get(id);
        let _ = reply.send(match view {
            Some(v) => Ok(Done::Job(Box::new(v))),
            None => Err(EngineError::UnknownJob(id.to_string())),
        });
    }

    /// Sends the job to the devices it may go to now.
    fn dispatch_job(&mut self, id: &str) {
        let fleet = &self.fleet;
        let Some(job) = self.jobs.jobs.get_mut(id) else {
            return;
        };
        let sent = job.dispatch(now_ms(), |d| fleet.is_online(d));
        if sent.is_empty() {
            return;
        }
        let spec = job.spec.clone();
        self.send_job(&sent, &spec);
        self.jobs.dirty.insert(id.to_string());
        self.jobs.unannounced.insert(id.to_string());
    }

    /// A device's `job` report.
    pub(super) fn job_report(&mut self, device: &DeviceId, report: &JobReport) {
        let Some(job) = self.jobs.jobs.get_mut(&report.id) else {
            return;
        };
        let phase = job.phase;
        if !job.report(device, report, now_ms()) {
            return;
        }
        let ended = job.phase != phase;
        let id = report.id.clone();
        self.jobs.dirty.insert(id.clone());
        // A device done makes room for the next.
        self.dispatch_job(&id);
        if ended {
            info!(job = %id, phase = ?self.jobs.jobs[&id].phase, "job ended");
            self.announce_job(&id);
        } else {
            self.jobs.unannounced.insert(id);
        }
    }

    /// A device said hello (it is online, maybe again): what it was sent
    /// and has not answered goes again, and what waited for it goes now.
    pub(super) fn jobs_device_online(&mut self, device: &DeviceId) {
        let now = now_ms();
        let active: Vec<String> = self.jobs.active.iter().cloned().collect();
        for id in active {
            let Some(job) = self.jobs.jobs.get_mut(&id) else {
                continue;
            };
            if job.resend(device, now) {
                let spec = job.spec.clone();
                self.send_job(std::slice::from_ref(device), &spec);
            }
            self.dispatch_job(&id);
        }
    }

    /// Deadlines, dispatch to devices that came online, stores progress
    /// at most once per [`FLUSH_EVERY`], announces progress, prunes.
    pub(super) async fn jobs_tick(&mut self) {
        let now = now_ms();
        let active: Vec<String> = self.jobs.active.iter().cloned().collect();
        for id in active {
            let Some(job) = self.jobs.jobs.get_mut(&id) else {
                self.jobs.active.remove(&id);
                continue;
            };
            let phase = job.phase;
            if job.tick(now) {
                self.jobs.dirty.insert(id.clone());
                self.jobs.unannounced.insert(id.clone());
            }
            let ended = job.phase != phase;
            self.dispatch_job(&id);
            let job = &self.jobs.jobs[&id];
            if job.phase.is_final() && job.devices.values().all(|r| r.state.is_final()) {
                self.jobs.active.remove(&id);
            }
            if ended {
                self.announce_job(&id);
            }
        }
        let due = self
            .jobs
            .last_flush
            .is_none_or(|t| t.elapsed() >= FLUSH_EVERY);
        if due && !self.jobs.dirty.is_empty() {
            self.jobs.last_flush = Some(Instant::now());
            let mut writes: Vec<Write> = std::mem::take(&mut self.jobs.dirty)
                .into_iter()
                .filter_map(|id| self.jobs.jobs.get(&id))
                .map(|j| Write::Job(Box::new(j.clone())))
                .collect();
            writes.extend(self.prune_jobs());
            self.record(writes).await;
        }
        let ids: Vec<String> = std::mem::take(&mut self.jobs.unannounced)
            .into_iter()
            .collect();
        for id in ids {
            self.announce_job(&id);
        }
    }

    /// Deletes the oldest finished jobs beyond [`FINISHED_KEPT`].
    fn prune_jobs(&mut self) -> Vec<Write> {
        let mut finished: Vec<(u64, String)> = self
            .jobs
            .jobs
            .iter()
            .filter(|(id, j)| j.phase.is_final() && !self.jobs.active.contains(*id))
            .map(|(id, j)| (j.finished_ms.unwrap_or(0), id.clone()))
            .collect();
        if finished.len() <= FINISHED_KEPT {
            return Vec::new();
        }
        finished.sort();
        let excess = finished.len() - FINISHED_KEPT;
        finished
            .into_iter()
            .take(excess)
            .map(|(_, id)| {
                self.jobs.jobs.remove(&id);
                Write::DeleteJob(id)
            })
            .collect()
    }

    fn announce_job(&mut self, id: &str) {
        self.jobs.unannounced.remove(id);
        if let Some(j) = self.jobs.jobs.get(id) {
            self.emit(Change::Job {
                job: Box::new(j.view(false)),
            });
        }
    }
}
