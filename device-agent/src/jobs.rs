//! Edge jobs: run-to-completion containers the orchestrator sends with
//! `RunJob`, one at most per id.
//!
//! A job's container is `drover-job-<device>-<id>`, labelled managed, with
//! this device and `io.drover.job=<id>`; it carries no app label, so the
//! reconciler never sees it (`ManagedContainer::from_labels`). The runner
//! task owns the list of running and finished jobs (the last
//! [`FINISHED_KEPT`]); each job runs in a task of its own that pulls,
//! creates, starts, waits (killing it past its timeout or on `CancelJob`),
//! reads the last 4 KiB of its output, removes the container and reports.
//! `<state-dir>/jobs.json` (written by rename) keeps the running jobs'
//! specs and the finished reports: after a restart a job's container is
//! waited on again, and final reports are sent again on every reconnect
//! (the orchestrator ignores a report it already has).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use drover_shared::job::{self, JobPhase, JobReport, JobSpec, LABEL_JOB, OUTPUT_TAIL_BYTES};
use drover_shared::model::{ImageRef, LABEL_DEVICE, LABEL_MANAGED};
use drover_shared::payload::Secrets;
use drover_shared::DeviceId;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn, Instrument};

use crate::mqtt::Publisher;
use crate::now_ms;
use crate::runtime::{DockerRuntime, Runtime, RuntimeError};

/// Jobs running at once on one device; one more is refused as busy.
pub const MAX_RUNNING: usize = 4;
/// Finished jobs remembered (their reports re-sent, their ids not run again).
pub const FINISHED_KEPT: usize = 32;
const FILE: &str = "jobs.json";

/// What the agent core hands the runner.
#[derive(Debug)]
pub enum JobInput {
    Run(JobSpec),
    Cancel(String),
    /// Connected to the broker (again): re-send the reports it may lack.
    Connected,
}

/// Docker's name for a job's container.
pub fn container_name(device: &DeviceId, id: &str) -> String {
    format!("drover-job-{device}-{id}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunningRecord {
    spec: JobSpec,
    started_at_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    running: Vec<RunningRecord>,
    #[serde(default)]
    finished: Vec<JobReport>,
}

struct Running {
    spec: JobSpec,
    latest: JobReport,
    cancel: watch::Sender<bool>,
}

/// Starts the runner; the sender is the core's way in.
pub fn spawn(
    runtime: DockerRuntime,
    publisher: Publisher,
    device: DeviceId,
    state_dir: &Path,
    secrets: watch::Receiver<Arc<Secrets>>,
) -> (mpsc::Sender<JobInput>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let (updates_tx, updates_rx) = mpsc::channel(256);
    let path = state_dir.join(FILE);
    let saved = load(&path);
    let runner = Runner {
        runtime,
        publisher,
        device,
        path,
        secrets,
        running: HashMap::new(),
        finished: saved.finished.into_iter().collect(),
        updates_tx,
    };
    let task = tokio::spawn(runner.run(rx, updates_rx, saved.running).in_current_span());
    (tx, task)
}

fn load(path: &Path) -> Saved {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(error = %e, "ignoring unreadable jobs.json");
            Saved::default()
        }),
        Err(_) => Saved::default(),
    }
}

/// Through the agent's one atomic writer (`store::write_file`): synced,
/// renamed, and no temporary file left behind when the disk is full.
fn save(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(saved).map_err(std::io::Error::other)?;
    crate::store::write_file(path, &bytes, None)
}

struct Runner {
    runtime: DockerRuntime,
    publisher: Publisher,
    device: DeviceId,
    path: PathBuf,
    secrets: watch::Receiver<Arc<Secrets>>,
    running: HashMap<String, Running>,
    finished: VecDeque<JobReport>,
    updates_tx: mpsc::Sender<JobReport>,
}

fn report(id: &str, phase: JobPhase) -> JobReport {
    JobReport {
        id: id.to_string(),
        phase,
        exit_code: None,
        output_tail: String::new(),
        error: String::new(),
        started_at_ms: 0,
        finished_at_ms: 0,
    }
}

impl Runner {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<JobInput>,
        mut updates: mpsc::Receiver<JobReport>,
        was_running: Vec<RunningRecord>,
    ) {
        self.adopt(was_running).await;
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(JobInput::Run(spec)) => self.start(spec),
                    Some(JobInput::Cancel(id)) => self.cancel(&id),
                    Some(JobInput::Connected) => {
                        for r in &self.finished {
                            self.send(r);
                        }
                        for r in self.running.values() {
                            self.send(&r.latest);
                        }
                    }
                    None => return,
                },
                Some(r) = updates.recv() => self.update(r),
            }
        }
    }

    fn send(&self, r: &JobReport) {
        if let Err(e) = self.publisher.send(r) {
            warn!(job = %r.id, error = %e, "job report dropped");
        }
    }

    fn persist(&self) {
        let saved = Saved {
            running: self
                .running
                .values()
                .map(|r| RunningRecord {
                    spec: r.spec.clone(),
                    started_at_ms: r.latest.started_at_ms,
                })
                .collect(),
            finished: self.finished.iter().cloned().collect(),
        };
        if let Err(e) = save(&self.path, &saved) {
            warn!(error = %e, "cannot write jobs.json");
        }
    }

    fn known(&self, id: &str) -> Option<&JobReport> {
        self.running
            .get(id)
            .map(|r| &r.latest)
            .or_else(|| self.finished.iter().find(|r| r.id == id))
    }

    fn finish(&mut self, r: JobReport) {
        self.running.remove(&r.id);
        self.finished.retain(|f| f.id != r.id);
        self.finished.push_back(r);
        while self.finished.len() > FINISHED_KEPT {
            self.finished.pop_front();
        }
        self.persist();
    }

    fn start(&mut self, mut spec: JobSpec) {
        if let Some(r) = self.known(&spec.id) {
            self.send(r);
            return;
        }
        let at = now_ms();
        if let Err(e) = spec.validate() {
            let mut r = report(&spec.id, JobPhase::Failed);
            r.error = format!("{}: {}", e.field, e.message);
            r.finished_at_ms = at;
            self.send(&r);
            self.finish(r);
            return;
        }
        if self.running.len() >= MAX_RUNNING {
            let mut r = report(&spec.id, JobPhase::Failed);
            r.error = format!("busy: {MAX_RUNNING} jobs already run on this device");
            r.finished_at_ms = at;
            self.send(&r);
            self.finish(r);
            return;
        }
        info!(job = %spec.id, image = %spec.image, "job accepted");
        let latest = report(&spec.id, JobPhase::Accepted);
        self.send(&latest);
        self.launch(spec, latest, None);
        self.persist();
    }

    fn launch(&mut self, spec: JobSpec, latest: JobReport, resume: Option<String>) {
        let (cancel, cancelled) = watch::channel(false);
        let job = Job {
            runtime: self.runtime.clone(),
            device: self.device.clone(),
            secrets: self.secrets.clone(),
            updates: self.updates_tx.clone(),
            spec: spec.clone(),
            started_at_ms: latest.started_at_ms,
        };
        self.running.insert(
            spec.id.clone(),
            Running {
                spec,
                latest,
                cancel,
            },
        );
        tokio::spawn(job.run(cancelled, resume).in_current_span());
    }

    fn cancel(&mut self, id: &str) {
        if let Some(r) = self.running.get(id) {
            info!(job = %id, "cancelling job");
            r.cancel.send_replace(true);
        } else if let Some(r) = self.known(id) {
            self.send(r);
        }
    }

    fn update(&mut self, r: JobReport) {
        self.send(&r);
        if r.phase.is_final() {
            info!(job = %r.id, phase = r.phase.as_str(), exit_code = ?r.exit_code, "job finished");
            self.finish(r);
        } else if let Some(run) = self.running.get_mut(&r.id) {
            let started = run.latest.started_at_ms != r.started_at_ms;
            run.latest = r;
            if started {
                self.persist();
            }
        }
    }

    /// After a restart: a job's container from before is waited on again
    /// (its timeout counted from when it started) or, unknown, removed;
    /// a job recorded running whose container is gone has failed.
    async fn adopt(&mut self, was_running: Vec<RunningRecord>) {
        let containers = match list_jobs(&self.runtime, &self.device).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot list job containers");
                Vec::new()
            }
        };
        let mut specs: HashMap<String, RunningRecord> = was_running
            .into_iter()
            .map(|r| (r.spec.id.clone(), r))
            .collect();
        for (container, id) in containers {
            match specs.remove(&id) {
                Some(rec) if self.known(&id).is_none() => {
                    info!(job = %id, "waiting again on a job started before the restart");
                    let mut latest = report(&id, JobPhase::Running);
                    latest.started_at_ms = rec.started_at_ms;
                    self.launch(rec.spec, latest, Some(container));
                }
                _ => {
                    let _ = remove(&self.runtime, &container).await;
                }
            }
        }
        for (id, rec) in specs {
            if self.known(&id).is_some() {
                continue;
            }
            let mut r = report(&id, JobPhase::Failed);
            r.started_at_ms = rec.started_at_ms;
            r.finished_at_ms = now_ms();
            r.error = "the agent restarted and the job's container was gone".into();
            self.send(&r);
            self.finish(r);
        }
        self.persist();
    }
}

/// This device's job containers: (container id, job id).
async fn list_jobs(
    runtime: &DockerRuntime,
    device: &DeviceId,
) -> Result<Vec<(String, String)>, RuntimeError> {
    let d = runtime.client().await?;
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_DEVICE}={device}"),
            LABEL_JOB.to_string(),
        ],
    )]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let list = d
        .list_containers(Some(opts))
        .await
        .map_err(|e| RuntimeError::Docker(e.to_string()))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels.unwrap_or_default();
            if labels.get(LABEL_DEVICE).map(String::as_str) != Some(device.as_str()) {
                return None;
            }
            Some((c.id?, labels.get(LABEL_JOB)?.clone()))
        })
        .collect())
}

async fn remove(runtime: &DockerRuntime, container: &str) -> Result<(), RuntimeError> {
    let d = runtime.client().await?;
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    match d.remove_container(container, Some(opts)).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(RuntimeError::Docker(e.to_string())),
    }
}

/// One job's run, in a task of its own.
struct Job {
    runtime: DockerRuntime,
    device: DeviceId,
    secrets: watch::Receiver<Arc<Secrets>>,
    updates: mpsc::Sender<JobReport>,
    spec: JobSpec,
    started_at_ms: u64,
}

enum Ended {
    Exited,
    TimedOut,
    Cancelled,
}

impl Job {
    async fn tell(&self, r: JobReport) {
        let _ = self.updates.send(r).await;
    }

    async fn run(mut self, mut cancelled: watch::Receiver<bool>, resume: Option<String>) {
        let id = self.spec.id.clone();
        let container = match resume {
            Some(c) => c,
            None => {
                let res = {
                    let prepare = self.prepare();
                    tokio::pin!(prepare);
                    tokio::select! {
                        r = &mut prepare => r,
                        () = until_cancelled(&mut cancelled) => Err(None),
                    }
                };
                match res {
                    Ok(c) => c,
                    Err(e) => {
                        // A container made before the cancel goes too.
                        let name = container_name(&self.device, &id);
                        let _ = remove(&self.runtime, &name).await;
                        let mut r = report(&id, JobPhase::Cancelled);
                        if let Some(e) = e {
                            r.phase = JobPhase::Failed;
                            r.error = e;
                        }
                        r.started_at_ms = self.started_at_ms;
                        r.finished_at_ms = now_ms();
                        self.tell(r).await;
                        return;
                    }
                }
            }
        };
        let deadline = self.started_at_ms.saturating_add(self.spec.timeout_ms);
        let left = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let ended = tokio::select! {
            () = wait(&self.runtime, &container) => Ended::Exited,
            () = tokio::time::sleep(left) => Ended::TimedOut,
            () = until_cancelled(&mut cancelled) => Ended::Cancelled,
        };
        let mut r = report(&id, JobPhase::Succeeded);
        r.started_at_ms = self.started_at_ms;
        if !matches!(ended, Ended::Exited) {
            kill(&self.runtime, &container).await;
        }
        r.finished_at_ms = now_ms();
        let (exit_code, output) = collect(&self.runtime, &container).await;
        r.exit_code = exit_code;
        r.output_tail = output;
        r.phase = match ended {
            Ended::TimedOut => JobPhase::TimedOut,
            Ended::Cancelled => JobPhase::Cancelled,
            Ended::Exited if exit_code == Some(0) => JobPhase::Succeeded,
            Ended::Exited => JobPhase::Failed,
        };
        if matches!(ended, Ended::Exited) && exit_code.is_none() {
            r.error = "the container's exit code could not be read".into();
        }
        if let Err(e) = remove(&self.runtime, &container).await {
            warn!(job = %id, error = %e, "cannot remove the job's container");
        }
        self.tell(r).await;
    }

    /// Pull when missing, create and start; the container's id. `Err(Some)`
    /// is why it failed.
    async fn prepare(&mut self) -> Result<String, Option<String>> {
        let id = self.spec.id.clone();
        let image = ImageRef::parse(&self.spec.image).map_err(Some)?;
        let present = self
            .runtime
            .image_present(&image)
            .await
            .map_err(|e| Some(e.to_string()))?;
        if !present {
            self.tell(report(&id, JobPhase::Pulling)).await;
            let auth = crate::secrets::credentials_for(&self.secrets.borrow(), &image).cloned();
            self.runtime
                .pull(
                    &image,
                    auth.as_ref(),
                    &mut |_: crate::runtime::PullProgress| {},
                )
                .await
                .map_err(|e| Some(format!("pulling {}: {e}", self.spec.image)))?;
        }
        let name = container_name(&self.device, &id);
        // A leftover of the same id (a restart between create and the
        // record) would block the name.
        let _ = remove(&self.runtime, &name).await;
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_DEVICE.to_string(), self.device.to_string()),
            (LABEL_JOB.to_string(), id.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(self.spec.image.clone()),
            cmd: (!self.spec.command.is_empty()).then(|| self.spec.command.clone()),
            env: Some(
                self.spec
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(labels),
            host_config: Some(HostConfig {
                security_opt: Some(vec!["no-new-privileges:true".to_string()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let d = self
            .runtime
            .client()
            .await
            .map_err(|e| Some(e.to_string()))?;
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = d
            .create_container(Some(opts), body)
            .await
            .map_err(|e| Some(format!("creating the container: {e}")))?;
        if let Err(e) = d.start_container(&created.id, None).await {
            let _ = remove(&self.runtime, &created.id).await;
            return Err(Some(format!("starting the container: {e}")));
        }
        self.started_at_ms = now_ms();
        let mut r = report(&id, JobPhase::Running);
        r.started_at_ms = self.started_at_ms;
        self.tell(r).await;
        Ok(created.id)
    }
}

/// Returns once the job is cancelled; never when its runner is gone.
async fn until_cancelled(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Returns when the container is no longer running (or cannot be asked).
async fn wait(runtime: &DockerRuntime, container: &str) {
    loop {
        let Ok(d) = runtime.client().await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut stream = d.wait_container(container, None);
        // Ends with the exit (a non-zero code arrives as an error).
        let _ = stream.next().await;
        match d.inspect_container(container, None).await {
            Ok(i) if i.state.as_ref().and_then(|s| s.running) == Some(true) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })
            | Ok(_) => return,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn kill(runtime: &DockerRuntime, container: &str) {
    if let Ok(d) = runtime.client().await {
        let opts = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
        let _ = d.kill_container(container, Some(opts)).await;
        // The exit code is set once the kill is through.
        let mut stream = d.wait_container(container, None);
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    }
}

/// The exit code and the last [`OUTPUT_TAIL_BYTES`] of the output.
async fn collect(runtime: &DockerRuntime, container: &str) -> (Option<i64>, String) {
    let Ok(d) = runtime.client().await else {
        return (None, String::new());
    };
    let exit = d
        .inspect_container(container, None)
        .await
        .ok()
        .and_then(|i| i.state.and_then(|s| s.exit_code));
    let opts = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .follow(false)
        .build();
    let mut logs = d.logs(container, Some(opts));
    let mut buf: Vec<u8> = Vec::new();
    while let Some(Ok(chunk)) = logs.next().await {
        buf.extend_from_slice(&chunk.into_bytes());
        if buf.len() > 4 * OUTPUT_TAIL_BYTES {
            buf.drain(..buf.len() - OUTPUT_TAIL_BYTES);
        }
    }
    (exit, job::tail(&buf, OUTPUT_TAIL_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_list_round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        assert!(load(&path).finished.is_empty());
        let mut r = report("j1", JobPhase::Succeeded);
        r.exit_code = Some(0);
        let saved = Saved {
            running: vec![RunningRecord {
                spec: JobSpec {
                    id: "j2".into(),
                    image: "busybox:1".into(),
                    command: vec!["true".into()],
                    env: Default::default(),
                    timeout_ms: 5,
                },
                started_at_ms: 7,
            }],
            finished: vec![r.clone()],
        };
        save(&path, &saved).expect("saved");
        let back = load(&path);
        assert_eq!(back.finished, vec![r]);
        assert_eq!(back.running[0].spec.id, "j2");
        assert_eq!(back.running[0].started_at_ms, 7);
        assert!(!dir.path().join("jobs.json.tmp").exists());
    }
}
