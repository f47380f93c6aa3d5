//! The Drover device agent: keeps the local Docker daemon at the desired
//! state it receives over MQTT, and reports heartbeats, state, logs and
//! telemetry.
//!
//! Tasks: the MQTT event loop ([`mqtt`]), the reconciler ([`reconcile`]),
//! telemetry ([`telemetry`]) and log followers ([`logs`]). The agent core in
//! this file owns the desired state ([`desired`]) and is the only task that
//! decides what to acknowledge; the others report to it over channels.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod config_file;
pub mod desired;
pub mod discovery;
pub mod docker_events;
pub mod enroll;
pub mod images;
pub mod inventory;
pub mod jobs;
pub mod lock;
pub mod logs;
pub mod mqtt;
pub mod pull;
pub mod reconcile;
pub mod runtime;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod update;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_shared::model::{DesiredState, ObservedState};
use drover_shared::payload::{
    Ack, AckPhase, Action, DeviceEvent, EventKind, Heartbeat, Secrets, StateReport, Status,
};
use drover_shared::DeviceId;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, info_span, warn, Instrument};

pub use config::{AgentConfig, ConfigError};

use crate::desired::{AckOut, Intake};
use crate::mqtt::{MqttEvent, Publisher};
use crate::reconcile::{ReconcileEvent, Reconciler};
use crate::runtime::DockerRuntime;
use crate::secrets::SecretsStore;
use crate::store::DesiredStore;

/// How long shutdown waits for the offline status and DISCONNECT to go out.
const GOODBYE_GRACE: Duration = Duration::from_secs(3);
/// How often a state directory that failed a write is tried again, so its
/// recovery is noticed (and the held state saved) without a new deploy.
const STORAGE_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent setup")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Credential(#[from] enroll::CredentialError),
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
}

/// The device id and stored credential an agent with this configuration
/// would use. Creates the state directory (and a device id) if needed.
#[derive(Debug)]
pub struct Identity {
    pub device: DeviceId,
    pub credential: Option<enroll::Credential>,
}

/// The error and its causes on one line, for events and state reports.
pub(crate) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

pub fn identity_for(config: &AgentConfig) -> Result<Identity, AgentError> {
    config::prepare_state_dir(&config.state_dir)?;
    let device = config::resolve_device_id(config.device_id.as_ref(), &config.state_dir)?;
    let credential = enroll::load(&config.state_dir, &device)?;
    Ok(Identity { device, credential })
}

pub use enroll::save as save_credential;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs the agent until `shutdown` resolves. Returns an error only for a
/// setup failure (an unwritable state directory); an unreachable broker or
/// Docker daemon is retried, never fatal.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    config::prepare_state_dir(&config.state_dir)?;
    // Held until this function returns: before the device id is read and
    // anything connects, so a second agent on this directory never
    // reaches the broker.
    let _lock = lock::acquire(&config.state_dir)?;
    // Not fatal: the agent runs on what it can read and reports this.
    let storage_error = config::probe_writable(&config.state_dir)
        .err()
        .map(|e| error_text(&e));
    if let Some(e) = &storage_error {
        error!(error = %e, "the state directory cannot be written; running on what it holds");
    }
    let Identity {
        device,
        mut credential,
    } = identity_for(&config)?;
    let span = info_span!("device", device = %device);
    // A token next to a stored credential is kept for one re-enrollment,
    // should the broker refuse that credential (revoked, then a new token
    // made for this device): no need to delete the credential file first.
    let mut reenroll = None;
    if let Some(token) = &config.enroll_token {
        if credential.is_none() {
            let enrolling = enroll::enroll(&config, &device, token).instrument(span.clone());
            tokio::pin!(shutdown);
            tokio::select! {
                res = enrolling => credential = Some(res?),
                () = &mut shutdown => return Ok(()),
            }
            run_device(config, device, credential, None, storage_error, shutdown)
                .instrument(span)
                .await;
            return Ok(());
        }
        reenroll = Some(mqtt::Reenroll {
            config: config.clone(),
            token: token.clone(),
        });
    }
    run_device(
        config,
        device,
        credential,
        reenroll,
        storage_error,
        shutdown,
    )
    .instrument(span)
    .await;
    Ok(())
}

async fn run_device(
    config: AgentConfig,
    device: DeviceId,
    credential: Option<enroll::Credential>,
    reenroll: Option<mqtt::Reenroll>,
    storage_error: Option<String>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (rec_tx, rec_rx) = mpsc::channel(256);
    let health_tx = rec_tx.clone();
    let store = DesiredStore::new(&config.state_dir);
    let stored = match store.load() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, cause = ?std::error::Error::source(&e), "ignoring unreadable stored desired state");
            None
        }
    };
    if let Some(s) = &stored {
        info!(generation = s.generation, "resuming stored desired state");
    }
    // Registry credentials kept from the last run, so private images can
    // be pulled again before the broker is reachable.
    let secrets_store = SecretsStore::new(&config.state_dir);
    let secrets = secrets_store.load().unwrap_or_else(|e| {
        error!(error = %e, cause = ?std::error::Error::source(&e), "ignoring unreadable stored registry credentials");
        Secrets::default()
    });
    if !secrets.registries.is_empty() {
        info!(registries = ?secrets.hosts(), "loaded stored registry credentials");
    }
    let (secrets_tx, secrets_rx) = watch::channel(Arc::new(secrets));
    let intake = Intake::new(stored.clone());
    let runtime = DockerRuntime::new(device.clone());
    let ledger = match crate::images::ImageLedger::load(&config.state_dir) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, cause = ?std::error::Error::source(&e), "ignoring unreadable image ledger; images pulled before are no longer cleaned up");
            crate::images::ImageLedger::empty_at(&config.state_dir)
        }
    };
    let mut reconciler = Reconciler::new(Arc::new(runtime.clone()), device.clone(), rec_tx)
        .with_options(config.reconcile_options())
        .with_ledger(ledger)
        .with_secrets(secrets_rx);
    if let Some(s) = &stored {
        // Only a generation that was fully applied before the restart has
        // containers that may be treated as settled; one cut short is simply
        // finished by the first pass.
        let applied_before = store.load_applied();
        let applied = applied_before == Some(s.generation);
        if !applied {
            info!(
                generation = s.generation,
                "stored desired state was not fully applied before the restart; finishing it"
            );
        }
        reconciler = reconciler.restoring(s, applied, applied_before.unwrap_or(0));
    }
    // Reconciling starts at once from the stored state, broker or not.
    let stored_agent = stored.as_ref().and_then(|s| s.agent.clone());
    let (desired_tx, desired_rx) = watch::channel(stored.map(Arc::new));
    // Docker events poke the reconciler; a capacity of one is enough, since
    // one pending poke already means "pass soon".
    let (trigger_tx, trigger_rx) = mpsc::channel(1);

    let (publisher, eventloop, online_tx) = mqtt::client(&config, &device, credential.as_ref());
    // Self-update: the updater follows the desired agent binary.
    let (update_events_tx, update_events) = mpsc::channel(16);
    let updater = config.self_update.clone().map(|me| {
        let (target_tx, target_rx) = watch::channel(stored_agent);
        let (input_tx, input_rx) = mpsc::channel(64);
        tokio::spawn(
            update::run(
                me.clone(),
                config.state_dir.clone(),
                target_rx,
                input_rx,
                publisher.clone(),
                update_events_tx.clone(),
            )
            .in_current_span(),
        );
        Updater {
            me,
            target_tx,
            input_tx,
        }
    });
    drop(update_events_tx);
    let (mqtt_tx, mqtt_rx) = mpsc::channel(64);
    let log_positions = logs::Positions::load(&config.state_dir);
    let here = tracing::Span::current();
    let mqtt_task = tokio::spawn(
        mqtt::drive(eventloop, config.topics.clone(), device.clone(), online_tx, mqtt_tx, reenroll)
            .instrument(info_span!(parent: &here, "mqtt", broker = %format!("{}:{}", config.broker_host, config.broker_port))),
    );
    let (jobs_tx, jobs_task) = jobs::spawn(
        runtime.clone(),
        publisher.clone(),
        device.clone(),
        &config.state_dir,
        secrets_tx.subscribe(),
    );
    let workers = [
        jobs_task,
        tokio::spawn(
            reconciler
                .run(desired_rx, config.reconcile_interval, trigger_rx)
                .instrument(info_span!(parent: &here, "reconcile")),
        ),
        tokio::spawn(
            docker_events::watch(runtime.clone(), device.clone(), trigger_tx, health_tx)
                .instrument(info_span!(parent: &here, "docker-events")),
        ),
        tokio::spawn(
            telemetry::run(
                runtime.clone(),
                publisher.clone(),
                config.telemetry_interval,
            )
            .instrument(info_span!(parent: &here, "telemetry")),
        ),
        tokio::spawn(
            logs::run(runtime.clone(), publisher.clone(), log_positions.clone())
                .instrument(info_span!(parent: &here, "logs")),
        ),
    ];

    let core = Core {
        jobs: jobs_tx,
        publisher: publisher.clone(),
        runtime,
        store,
        intake,
        desired_tx,
        secrets_store,
        secrets_tx,
        started: Instant::now(),
        heartbeat_ms: config.heartbeat_interval.as_millis() as u64,
        labels: config.labels.clone(),
        seq: 0,
        observed: ObservedState {
            storage_error,
            ..ObservedState::default()
        },
        published: None,
        storage_retry_at: Instant::now() + STORAGE_RETRY,
        store_applied: 0,
        updater,
    };
    let exec = core
        .run(
            mqtt_rx,
            rec_rx,
            update_events,
            config.heartbeat_interval,
            shutdown,
        )
        .await;

    info!("shutting down");
    publisher.goodbye(now_ms(), GOODBYE_GRACE).await;
    for w in &workers {
        w.abort();
    }
    // Where each container's log stopped, so the next start neither
    // repeats nor skips lines.
    if let Err(e) = log_positions.save() {
        warn!(error = %e, "cannot save log positions");
    }
    let abort = mqtt_task.abort_handle();
    if tokio::time::timeout(GOODBYE_GRACE, mqtt_task)
        .await
        .is_err()
    {
        warn!("broker did not take the disconnect in time");
        abort.abort();
    }
    if let Some(exec) = exec {
        info!(digest = %exec.digest, "replacing this process with the agent binary");
        let e = exec.run();
        error!(error = %e, "cannot run the agent binary; exiting so the service manager restarts the agent");
        std::process::exit(1);
    }
}

/// The core's side of the updater task.
struct Updater {
    me: update::SelfUpdate,
    target_tx: watch::Sender<Option<drover_shared::update::AgentTarget>>,
    input_tx: mpsc::Sender<update::UpdateInput>,
}

/// The agent core: the single owner of the desired state and of acks.
struct Core {
    /// The edge job runner (`jobs.rs`).
    jobs: mpsc::Sender<jobs::JobInput>,
    publisher: Publisher,
    runtime: DockerRuntime,
    store: DesiredStore,
    intake: Intake,
    desired_tx: watch::Sender<Option<Arc<DesiredState>>>,
    secrets_store: SecretsStore,
    /// The registry credentials held; the reconciler pulls with them.
    secrets_tx: watch::Sender<Arc<Secrets>>,
    started: Instant,
    heartbeat_ms: u64,
    /// `--label`s, sent in every hello.
    labels: std::collections::BTreeMap<String, String>,
    seq: u64,
    observed: ObservedState,
    /// The last state report sent, to send only changes.
    published: Option<ObservedState>,
    /// While the state directory cannot be written: when to try again.
    storage_retry_at: Instant,
    /// The applied generation last handed to the store.
    store_applied: u64,
    /// `None`: this agent cannot replace its binary.
    updater: Option<Updater>,
}

impl Core {
    /// Runs until shutdown (`None`) or until the updater hands over a
    /// binary to replace this process with, after the state report that
    /// says so.
    async fn run(
        mut self,
        mut mqtt_rx: mpsc::Receiver<MqttEvent>,
        mut rec_rx: mpsc::Receiver<ReconcileEvent>,
        mut update_rx: mpsc::Receiver<update::UpdateEvent>,
        heartbeat_every: Duration,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Option<update::Exec> {
        self.observed.desired_generation = self.intake.held_generation();
        if let Some(e) = self.observed.storage_error.clone() {
            self.storage_event(EventKind::PersistenceFailed, e);
        }
        // The first heartbeat goes out with the connect; the ticker follows.
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + heartbeat_every,
            heartbeat_every,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return None,
                Some(ev) = mqtt_rx.recv() => self.on_mqtt(ev).await,
                Some(ev) = rec_rx.recv() => self.on_reconcile(ev).await,
                Some(ev) = update_rx.recv() => {
                    if let Some(exec) = self.on_update(ev) {
                        return Some(exec);
                    }
                }
                _ = heartbeat.tick() => {
                    self.heartbeat();
                    if self.observed.storage_error.is_some() && Instant::now() >= self.storage_retry_at {
                        self.persist().await;
                    }
                }
            }
        }
    }

    async fn on_mqtt(&mut self, ev: MqttEvent) {
        match ev {
            MqttEvent::Connected => {
                if let Err(e) = self.publisher.subscribe_own() {
                    warn!(error = %e, "could not subscribe");
                }
                self.send(&Status {
                    online: true,
                    at_ms: now_ms(),
                });
                self.resync();
                self.to_jobs(jobs::JobInput::Connected);
                if let Some(u) = &self.updater {
                    let _ = u.input_tx.try_send(update::UpdateInput::Online);
                }
            }
            MqttEvent::Blob(chunk) => {
                if let Some(u) = &self.updater {
                    let _ = u.input_tx.try_send(update::UpdateInput::Blob(chunk));
                }
            }
            MqttEvent::Disconnected => {
                debug!("offline; queueing state changes for the next connection")
            }
            MqttEvent::Desired(d) => self.offer(d.state, None).await,
            MqttEvent::Secrets(s) => self.take_secrets(s).await,
            MqttEvent::Command(c) => match c.action {
                Action::Apply { op, app, desired } => {
                    info!(command = %c.id, op = op.as_str(), %app, generation = desired.generation, "command");
                    self.offer(desired, Some((&c.id, Some(&app)))).await;
                }
                Action::RunJob(spec) => {
                    info!(command = %c.id, job = %spec.id, "run job");
                    self.to_jobs(jobs::JobInput::Run(spec));
                }
                Action::CancelJob { id } => self.to_jobs(jobs::JobInput::Cancel(id)),
                Action::Resync => {
                    self.ack(&AckOut {
                        command_id: c.id.clone(),
                        phase: AckPhase::Received,
                        detail: String::new(),
                    });
                    self.resync();
                    self.ack(&AckOut {
                        command_id: c.id,
                        phase: AckPhase::Succeeded,
                        detail: String::new(),
                    });
                }
            },
        }
    }

    /// Hands the job runner its input; when its queue is full the input is
    /// dropped (the orchestrator sends a job again on the next reconnect).
    fn to_jobs(&self, input: jobs::JobInput) {
        if let Err(e) = self.jobs.try_send(input) {
            warn!(error = %e, "job input dropped: the job runner is busy");
        }
    }

    /// Sends a fresh inventory (`hello`): on connect, and whenever what it
    /// shows changed (images pulled or removed, Docker gone or back).
    fn send_hello(&self) {
        let runtime = self.runtime.clone();
        let publisher = self.publisher.clone();
        let labels = self.labels.clone();
        let digest = self.updater.as_ref().map(|u| u.me.digest.clone());
        tokio::spawn(
            async move {
                let mut hello = inventory::collect(&runtime).await;
                hello.labels = labels;
                hello.self_update = digest.is_some();
                hello.agent_digest = digest;
                if let Err(e) = publisher.send(&hello) {
                    warn!(error = %e, "could not queue hello");
                }
            }
            .in_current_span(),
        );
    }

    /// Docker stopped answering: says so once (event, state report,
    /// inventory) and tells every waiting command why it waits.
    fn docker_down(&mut self, reason: String) {
        if self.observed.docker_error.is_none() {
            warn!(error = %reason, "docker is not reachable; operations wait for it");
            self.send(&DeviceEvent {
                at_ms: now_ms(),
                kind: EventKind::DockerUnreachable,
                app: None,
                container: None,
                detail: format!(
                    "{reason}; containers stay as Docker left them, operations wait for it"
                ),
            });
            self.send_hello();
        }
        // The first reason stands for the whole outage: the reconciler and
        // the event watcher word the same loss differently.
        self.observed
            .docker_error
            .get_or_insert_with(|| reason.clone());
        self.waiting(&format!("waiting for docker: {reason}"));
        self.publish_state();
    }

    fn docker_up(&mut self) {
        if self.observed.docker_error.take().is_none() {
            return;
        }
        info!("docker is reachable again");
        self.send(&DeviceEvent {
            at_ms: now_ms(),
            kind: EventKind::DockerReachable,
            app: None,
            container: None,
            detail: "docker is reachable again; reconciling".to_string(),
        });
        self.send_hello();
        self.waiting("docker is reachable again; resuming");
        self.publish_state();
    }

    /// A progress ack with `detail` for every command still waiting.
    fn waiting(&self, detail: &str) {
        for id in self.intake.pending_ids() {
            self.send(&Ack {
                command_id: id.to_string(),
                at_ms: now_ms(),
                phase: AckPhase::Progress,
                detail: detail.to_string(),
                progress: None,
            });
        }
    }

    /// Re-sends everything retained, e.g. after a reconnect to a broker that
    /// may have lost its retained messages.
    fn resync(&mut self) {
        self.send_hello();
        self.published = None;
        self.publish_state();
        self.heartbeat();
    }

    async fn offer(
        &mut self,
        state: DesiredState,
        command: Option<(&str, Option<&drover_shared::Name>)>,
    ) {
        let generation = state.generation;
        let offer = self.intake.offer(state, command);
        for ack in &offer.acks {
            self.ack(ack);
        }
        if let (Some(reason), Some((id, _))) = (&self.observed.docker_error, command) {
            if self.intake.pending_ids().any(|p| p == id) {
                self.send(&Ack {
                    command_id: id.to_string(),
                    at_ms: now_ms(),
                    phase: AckPhase::Progress,
                    detail: format!("waiting for docker: {reason}"),
                    progress: None,
                });
            }
        }
        if !offer.adopted {
            debug!(
                generation,
                held = self.intake.held_generation(),
                "desired state not adopted"
            );
            return;
        }
        let Some(held) = self.intake.held().cloned() else {
            return;
        };
        info!(generation, "adopted desired state");
        if let Some(u) = &self.updater {
            u.target_tx.send_if_modified(|t| {
                let changed = *t != held.agent;
                t.clone_from(&held.agent);
                changed
            });
        }
        self.desired_tx.send_replace(Some(Arc::new(held)));
        self.observed.desired_generation = generation;
        // Applied from memory whether or not it can be stored; a failure
        // is reported, not hidden in the log.
        self.persist().await;
        self.publish_state();
    }

    /// Stores the held desired state and the applied generation; reports a
    /// failure (event and state report) and the recovery after one.
    async fn persist(&mut self) {
        let store = self.store.clone();
        let held = self.intake.held().cloned();
        let applied = self.intake.applied_generation();
        let result = tokio::task::spawn_blocking(move || {
            if let Some(h) = &held {
                store.save(h)?;
            }
            if applied > 0 {
                store.save_applied(applied)?;
            }
            if held.is_none() && applied == 0 {
                // Nothing to save yet: whether a write would succeed.
                store.probe()?;
            }
            Ok::<_, store::StoreError>(())
        })
        .await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(error_text(&e)),
            Err(e) => Some(format!("saving the desired state failed: {e}")),
        };
        let generation = self.intake.held_generation();
        match failure {
            Some(text) => {
                self.storage_retry_at = Instant::now() + STORAGE_RETRY;
                // One event per failure episode; the state report always
                // carries the latest text.
                if self.observed.storage_error.is_none() {
                    error!(error = %text, generation, "could not persist desired state; running on the state held in memory");
                    self.storage_event(EventKind::PersistenceFailed, text.clone());
                }
                self.observed.storage_error = Some(text);
                self.publish_state();
            }
            None => {
                if self.observed.storage_error.take().is_some() {
                    info!(
                        generation,
                        "state directory writable again; desired state saved"
                    );
                    self.storage_event(
                        EventKind::PersistenceRecovered,
                        format!("the state directory takes writes again; desired state generation {generation} is saved"),
                    );
                    self.publish_state();
                }
            }
        }
    }

    fn storage_event(&self, kind: EventKind, text: String) {
        let detail = match kind {
            EventKind::PersistenceFailed => format!(
                "cannot write the state directory: {text}; running on the desired state held in memory (generation {}); a restart would find an older one",
                self.intake.held_generation()
            ),
            _ => text,
        };
        self.send(&DeviceEvent {
            at_ms: now_ms(),
            kind,
            app: None,
            container: None,
            detail,
        });
    }

    /// Keeps a newer set of registry credentials: on disk first (so a
    /// reboot keeps them), then for the reconciler. Only hosts are logged.
    async fn take_secrets(&mut self, incoming: Secrets) {
        if !secrets::replaces(&self.secrets_tx.borrow(), &incoming) {
            debug!(
                issued_at_ms = incoming.issued_at_ms,
                "registry credentials unchanged or older; ignored"
            );
            return;
        }
        let store = self.secrets_store.clone();
        let to_save = incoming.clone();
        match tokio::task::spawn_blocking(move || store.save(&to_save)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, cause = ?std::error::Error::source(&e), "could not persist registry credentials")
            }
            Err(e) => error!(error = %e, "persisting registry credentials panicked"),
        }
        info!(registries = ?incoming.hosts(), "registry credentials updated");
        self.secrets_tx.send_replace(Arc::new(incoming));
    }

    async fn on_reconcile(&mut self, ev: ReconcileEvent) {
        match ev {
            ReconcileEvent::Progress {
                generation,
                progress,
                detail,
            } => {
                for ack in self
                    .intake
                    .progress_acks(generation, &progress, &detail, now_ms())
                {
                    self.send(&ack);
                }
            }
            ReconcileEvent::Interim { generation, apps } => {
                if generation == self.intake.held_generation() {
                    self.observed.apps = apps;
                    self.publish_state();
                }
            }
            ReconcileEvent::Done(report) => {
                if report.generation != self.intake.held_generation() {
                    return;
                }
                for (app, f) in &report.failures {
                    warn!(generation = report.generation, %app, failure = %f, "reconcile finished with a failure");
                }
                for ack in self.intake.finished(report.generation, report.failures) {
                    self.ack(&ack);
                }
                let applied = self.intake.applied_generation();
                self.observed.applied_generation = applied;
                self.observed.apps = report.apps;
                if applied != self.store_applied {
                    self.store_applied = applied;
                    self.persist().await;
                }
                self.publish_state();
            }
            ReconcileEvent::Docker(Err(reason)) => self.docker_down(reason),
            ReconcileEvent::Docker(Ok(())) => self.docker_up(),
            ReconcileEvent::InventoryChanged => self.send_hello(),
            ReconcileEvent::Event(ev) => {
                debug!(kind = ?ev.kind, detail = ?ev.detail, "event");
                // Queued while offline (QoS 1): the orchestrator keeps a
                // bounded history, so late is better than lost.
                self.send(&ev);
            }
        }
    }

    fn on_update(&mut self, ev: update::UpdateEvent) -> Option<update::Exec> {
        match ev {
            update::UpdateEvent::Status(s) => {
                self.observed.agent_update = s;
                self.publish_state();
                None
            }
            update::UpdateEvent::Confirmed(detail) => {
                self.send(&DeviceEvent {
                    at_ms: now_ms(),
                    kind: EventKind::AgentUpdated,
                    app: None,
                    container: None,
                    detail,
                });
                None
            }
            update::UpdateEvent::Restart(exec) => {
                self.observed.agent_update = Some(drover_shared::update::AgentUpdateStatus {
                    digest: exec.digest.clone(),
                    phase: drover_shared::update::AgentUpdatePhase::Restarting,
                    error: None,
                });
                self.publish_state();
                Some(exec)
            }
        }
    }

    fn publish_state(&mut self) {
        if self.published.as_ref() == Some(&self.observed) {
            return;
        }
        self.send(&StateReport {
            at_ms: now_ms(),
            observed: self.observed.clone(),
        });
        self.published = Some(self.observed.clone());
    }

    fn heartbeat(&mut self) {
        self.seq += 1;
        self.publisher.send_sample(&Heartbeat {
            at_ms: now_ms(),
            seq: self.seq,
            uptime_s: self.started.elapsed().as_secs(),
            applied_generation: self.intake.applied_generation(),
            interval_ms: self.heartbeat_ms,
        });
    }

    fn ack(&self, a: &AckOut) {
        debug!(command = %a.command_id, phase = ?a.phase, "ack");
        self.send(&Ack {
            command_id: a.command_id.clone(),
            at_ms: now_ms(),
            phase: a.phase,
            detail: a.detail.clone(),
            progress: None,
        });
    }

    fn send<T: drover_shared::codec::Message>(&self, msg: &T) {
        if let Err(e) = self.publisher.send(msg) {
            warn!(kind = %T::KIND, error = %e, "message dropped");
        }
    }
}
