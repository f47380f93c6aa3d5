//! Makes the local runtime match the desired state.
//!
//! Split in two: [`plan`] is a pure function from (desired, actual) to steps,
//! so every decision is unit-tested; [`Reconciler`] executes a plan against a
//! [`Runtime`] and reports what it saw. The reconciler is level-triggered: it
//! never remembers what it did, it re-reads the runtime on every pass.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_shared::model::{
    AppPhase, AppStatus, ContainerSpec, ContainerStatus, DesiredState, ImageRef, RunState,
};
use drover_shared::payload::Progress;
use drover_shared::{DeviceId, Name};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::runtime::{container_name, labels_for, ManagedContainer, PullProgress, Runtime, RuntimeError};

/// Pull progress is sent at most this often per pass (≤ 2/s).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// One runtime action. Steps that act on an existing container carry its id.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Pull { app: Name, container: Name, image: String },
    Create { app: Name, spec: ContainerSpec },
    /// `id: None` starts the container created earlier in the same pass.
    Start { app: Name, container: Name, id: Option<String> },
    Stop { app: Name, container: Name, id: String },
    Remove { app: Name, container: Name, id: String },
}

impl Step {
    fn key(&self) -> (&Name, &Name) {
        match self {
            Step::Pull { app, container, .. }
            | Step::Start { app, container, .. }
            | Step::Stop { app, container, .. }
            | Step::Remove { app, container, .. } => (app, container),
            Step::Create { app, spec } => (app, &spec.name),
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Step::Pull { .. } => "pulling",
            Step::Create { .. } => "creating",
            Step::Start { .. } => "starting",
            Step::Stop { .. } => "stopping",
            Step::Remove { .. } => "removing",
        }
    }
}

/// The steps that take `actual` to `desired`; empty when converged.
///
/// Order matters: new images are pulled before anything is stopped, so a
/// failed pull leaves the old container running; old containers are removed
/// before new ones are created, because they share a name and may share
/// host ports.
pub fn plan(desired: &DesiredState, actual: &[ManagedContainer]) -> Vec<Step> {
    let mut pulls = Vec::new();
    let mut teardown = Vec::new();
    let mut creates = Vec::new();
    let mut starts = Vec::new();
    let mut claimed: HashSet<&str> = HashSet::new();

    let retire = |c: &ManagedContainer, teardown: &mut Vec<Step>| {
        if c.is_running() {
            teardown.push(Step::Stop { app: c.app.clone(), container: c.container.clone(), id: c.id.clone() });
        }
        teardown.push(Step::Remove { app: c.app.clone(), container: c.container.clone(), id: c.id.clone() });
    };

    for app in &desired.apps {
        let app_name = &app.spec.name;
        for spec in &app.spec.containers {
            let hash = spec.fingerprint();
            let candidates: Vec<&ManagedContainer> =
                actual.iter().filter(|c| &c.app == app_name && c.container == spec.name).collect();
            // Keep one container with the current spec, preferring a running one.
            let keep = candidates
                .iter()
                .filter(|c| c.spec_hash == hash)
                .max_by_key(|c| c.is_running())
                .copied();
            for c in &candidates {
                if keep.is_none_or(|k| k.id != c.id) {
                    retire(c, &mut teardown);
                }
                claimed.insert(c.id.as_str());
            }
            match (keep, app.run) {
                (None, run) => {
                    pulls.push(Step::Pull { app: app_name.clone(), container: spec.name.clone(), image: spec.image.clone() });
                    creates.push(Step::Create { app: app_name.clone(), spec: spec.clone() });
                    if run == RunState::Running {
                        starts.push(Step::Start { app: app_name.clone(), container: spec.name.clone(), id: None });
                    }
                }
                (Some(k), RunState::Running) if !k.is_running() && k.state != "paused" => {
                    starts.push(Step::Start { app: app_name.clone(), container: spec.name.clone(), id: Some(k.id.clone()) });
                }
                (Some(k), RunState::Stopped) if k.is_running() => {
                    teardown.push(Step::Stop { app: app_name.clone(), container: spec.name.clone(), id: k.id.clone() });
                }
                _ => {}
            }
        }
    }
    // Containers of apps, or of containers within apps, no longer desired.
    for c in actual.iter().filter(|c| !claimed.contains(c.id.as_str())) {
        retire(c, &mut teardown);
    }
    pulls.into_iter().chain(teardown).chain(creates).chain(starts).collect()
}

/// What a pass saw and whether it counts for its generation.
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    pub generation: u64,
    pub apps: Vec<AppStatus>,
    /// Docker's or the registry's text for the first failure, verbatim.
    pub failure: Option<String>,
}

/// Messages from the reconciler to the agent core.
#[derive(Debug)]
pub enum ReconcileEvent {
    Progress { generation: u64, progress: Progress },
    /// Work has started; apps being pulled are shown as such.
    Interim { generation: u64, apps: Vec<AppStatus> },
    /// The pass finished (converged or failed for good) for this generation.
    Done(PassReport),
}

/// Builds the per-app status from what the runtime shows after a pass.
pub fn observe(
    desired: &DesiredState,
    actual: &[ManagedContainer],
    errors: &BTreeMap<Name, String>,
    pulling: &HashSet<Name>,
) -> Vec<AppStatus> {
    let mut apps: Vec<AppStatus> = desired
        .apps
        .iter()
        .map(|app| {
            let containers: Vec<ContainerStatus> = app
                .spec
                .containers
                .iter()
                .map(|spec| {
                    let hash = spec.fingerprint();
                    let found = actual
                        .iter()
                        .filter(|c| c.app == app.spec.name && c.container == spec.name)
                        .max_by_key(|c| (c.spec_hash == hash, c.is_running()));
                    match found {
                        Some(c) => ContainerStatus {
                            name: spec.name.clone(),
                            image: c.image.clone(),
                            container_id: Some(c.id.clone()),
                            state: c.state.clone(),
                            exit_code: if c.is_running() { None } else { c.exit_code },
                            error: None,
                        },
                        None => ContainerStatus {
                            name: spec.name.clone(),
                            image: spec.image.clone(),
                            container_id: None,
                            state: "absent".to_string(),
                            exit_code: None,
                            error: None,
                        },
                    }
                })
                .collect();
            let error = errors.get(&app.spec.name).cloned();
            let all_running = containers.iter().all(|c| c.state == "running");
            let none_running = containers.iter().all(|c| c.state != "running" && c.state != "restarting");
            let phase = if error.is_some() {
                AppPhase::Failed
            } else if pulling.contains(&app.spec.name) {
                AppPhase::Pulling
            } else {
                match app.run {
                    RunState::Running if all_running => AppPhase::Running,
                    RunState::Stopped if none_running => AppPhase::Stopped,
                    _ => AppPhase::Starting,
                }
            };
            AppStatus { name: app.spec.name.clone(), phase, error, attempts: 0, next_retry_at_ms: None, containers }
        })
        .collect();
    // An app that should be gone but could not be removed is still news.
    for (name, error) in errors.iter().filter(|(n, _)| desired.app(n).is_none()) {
        apps.push(AppStatus { name: name.clone(), phase: AppPhase::Failed, error: Some(error.clone()), attempts: 0, next_retry_at_ms: None, containers: vec![] });
    }
    apps
}

/// Executes plans against a runtime, one pass at a time.
pub struct Reconciler<R> {
    runtime: Arc<R>,
    device: DeviceId,
    events: mpsc::Sender<ReconcileEvent>,
    /// The generation of the last finished pass. A periodic retry of the same
    /// generation sends no interim report, so the state does not flap
    /// between pulling and failed every interval.
    finished: AtomicU64,
}

impl<R: Runtime> Reconciler<R> {
    pub fn new(runtime: Arc<R>, device: DeviceId, events: mpsc::Sender<ReconcileEvent>) -> Self {
        Reconciler { runtime, device, events, finished: AtomicU64::new(0) }
    }

    /// Runs passes until `desired` closes: on every new desired state and on
    /// every `interval` tick (drift: a crashed container, a manual `docker rm`).
    pub async fn run(self, mut desired: watch::Receiver<Option<Arc<DesiredState>>>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let current = desired.borrow_and_update().clone();
            if let Some(state) = current {
                match self.pass(&state, &desired).await {
                    Ok(Some(report)) => {
                        if self.events.send(ReconcileEvent::Done(report)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => debug!(generation = state.generation, "pass superseded by a newer desired state"),
                    Err(e) => warn!(generation = state.generation, error = %e, "reconcile pass could not run; retrying later"),
                }
            }
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    }

    /// One pass. `Ok(None)`: a newer desired state arrived mid-pass, so this
    /// one no longer counts. `Err`: the runtime is unreachable; nothing is
    /// definitive and the next tick retries.
    pub async fn pass(
        &self,
        desired: &DesiredState,
        newer: &watch::Receiver<Option<Arc<DesiredState>>>,
    ) -> Result<Option<PassReport>, RuntimeError> {
        let generation = desired.generation;
        let actual = self.runtime.list_managed().await?;
        let steps = plan(desired, &actual);
        if steps.is_empty() {
            let apps = observe(desired, &actual, &BTreeMap::new(), &HashSet::new());
            self.finished.store(generation, Ordering::Relaxed);
            return Ok(Some(PassReport { generation, apps, failure: None }));
        }
        info!(generation, steps = steps.len(), "reconciling");

        let mut pulling = HashSet::new();
        for s in &steps {
            if let Step::Pull { app, image, .. } = s {
                let present = match ImageRef::parse(image) {
                    Ok(r) => self.runtime.image_present(&r).await?,
                    Err(_) => false,
                };
                if !present {
                    pulling.insert(app.clone());
                }
            }
        }
        if self.finished.load(Ordering::Relaxed) != generation {
            let interim = observe(desired, &actual, &BTreeMap::new(), &pulling);
            let _ = self.events.try_send(ReconcileEvent::Interim { generation, apps: interim });
        }

        let mut errors: BTreeMap<Name, String> = BTreeMap::new();
        let mut failed: HashSet<(Name, Name)> = HashSet::new();
        let mut created: BTreeMap<(Name, Name), String> = BTreeMap::new();
        for step in steps {
            if newer.has_changed().unwrap_or(false) {
                return Ok(None);
            }
            let (app, container) = step.key();
            let key = (app.clone(), container.clone());
            if failed.contains(&key) {
                continue;
            }
            self.progress(generation, Progress {
                step: step.word().to_string(),
                container: container.clone(),
                current_bytes: None,
                total_bytes: None,
            });
            let result = self.execute(generation, &step, &pulling, &mut created).await;
            match result {
                Ok(()) => {}
                Err(e) if e.is_unreachable() => return Err(e),
                Err(e) => {
                    let text = e.to_string();
                    warn!(app = %key.0, container = %key.1, step = step.word(), error = %text, "step failed");
                    errors.entry(key.0.clone()).or_insert(text);
                    failed.insert(key);
                }
            }
        }
        let actual = self.runtime.list_managed().await?;
        let apps = observe(desired, &actual, &errors, &HashSet::new());
        let failure = errors.values().next().cloned();
        self.finished.store(generation, Ordering::Relaxed);
        Ok(Some(PassReport { generation, apps, failure }))
    }

    async fn execute(
        &self,
        generation: u64,
        step: &Step,
        pulling: &HashSet<Name>,
        created: &mut BTreeMap<(Name, Name), String>,
    ) -> Result<(), RuntimeError> {
        match step {
            Step::Pull { app, container, image } => {
                if !pulling.contains(app) {
                    return Ok(());
                }
                let image_ref = ImageRef::parse(image).map_err(|e| RuntimeError::Docker(format!("invalid image reference {image:?}: {e}")))?;
                if self.runtime.image_present(&image_ref).await? {
                    return Ok(());
                }
                info!(%image, "pulling");
                let mut last: Option<Instant> = None;
                let events = self.events.clone();
                let container = container.clone();
                let mut on_progress = move |p: PullProgress| {
                    if last.is_none_or(|l| l.elapsed() >= PROGRESS_EVERY) {
                        last = Some(Instant::now());
                        let progress = Progress {
                            step: "pulling".to_string(),
                            container: container.clone(),
                            current_bytes: Some(p.current),
                            total_bytes: Some(p.total),
                        };
                        let _ = events.try_send(ReconcileEvent::Progress { generation, progress });
                    }
                };
                self.runtime.pull(&image_ref, &mut on_progress).await
            }
            Step::Create { app, spec } => {
                let name = container_name(&self.device, app, &spec.name);
                let labels = labels_for(&self.device, app, spec, generation);
                let id = self.runtime.create(&name, spec, labels).await?;
                info!(%app, container = %spec.name, %id, "created");
                created.insert((app.clone(), spec.name.clone()), id);
                Ok(())
            }
            Step::Start { app, container, id } => {
                let id = match id {
                    Some(id) => id.clone(),
                    None => created
                        .get(&(app.clone(), container.clone()))
                        .cloned()
                        .unwrap_or_else(|| container_name(&self.device, app, container)),
                };
                self.runtime.start(&id).await?;
                info!(%app, %container, "started");
                Ok(())
            }
            Step::Stop { app, container, id } => {
                self.runtime.stop(id).await?;
                info!(%app, %container, "stopped");
                Ok(())
            }
            Step::Remove { app, container, id } => {
                self.runtime.remove(id).await?;
                info!(%app, %container, "removed");
                Ok(())
            }
        }
    }

    fn progress(&self, generation: u64, progress: Progress) {
        let _ = self.events.try_send(ReconcileEvent::Progress { generation, progress });
    }
}

#[cfg(test)]
mod tests;
