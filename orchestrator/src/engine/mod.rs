//! The engine: one task owns the fleet (the [`Fleet`] state machine and the
//! registry [`SecretsBook`]). Surfaces send it commands and reads through an
//! [`EngineHandle`] and await the reply; the MQTT link sends it device
//! messages. No lock is held across I/O: the engine applies a change to
//! memory at once, queues its writes on the store writer, and carries out
//! what follows (publishing, replying) when the writes are durable, while
//! it goes on with the next input. A failed write fails its command and
//! makes the engine reload its state from redb, so memory never stays ahead
//! of the file.
//!
//! Every change in the fleet goes out on a bounded broadcast channel
//! ([`EngineHandle::subscribe`]). A subscriber that falls behind loses
//! changes and is told how many (`RecvError::Lagged`); it never slows the
//! engine down.

pub mod agent_releases;
pub mod commands;
mod jobs;
mod outbox;
mod rollouts;
pub mod rule_defs;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_shared::model::{AppSpec, DesiredState, RunState};
use drover_shared::payload::{
    Action, Command as DeviceCommand, Desired, EnrollOutcome, EnrollRequest, Enrolled, Op,
    RegistryCredential, Secret,
};
use drover_shared::topic::TopicKind;
use drover_shared::{encode, DeviceId, Name};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::contract::{self, AuditOutcome, Change};
use crate::core::fleet::{DeviceMessage, Fleet, FleetError};
use crate::core::records::{AppRecord, ImagePlatforms, OperationRecord, Placement, RegistryRecord};
use crate::core::registries::SecretsBook;
use crate::link::Event;
use crate::metrics::Metrics;
use crate::security::access::Access;
use crate::security::identity::Identities;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoreError, Write};

pub use commands::{CommandError, Commands, Reply};
pub use outbox::Outbox;

pub use crate::clock::now_ms;

/// Inputs waiting for the engine; senders wait when it is full.
const INPUT_QUEUE: usize = 10_000;
/// Changes a subscriber may fall behind by before it loses some.
pub const CHANGES_CAPACITY: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("the change could not be stored; nothing was changed: {0}")]
    Store(#[from] StoreError),
    /// A write failed a moment ago and the engine is reloading its state
    /// from the store; nothing was changed.
    #[error("the store is recovering from a failed write; nothing was changed, try again")]
    Recovering,
    #[error("no credentials stored for registry {0}")]
    UnknownRegistry(String),
    #[error("rollout {0} does not exist")]
    UnknownRollout(String),
    #[error("{message}")]
    RolloutInvalid { field: String, message: String },
    #[error("{message}")]
    RolloutConflict { field: String, message: String },
    #[error("job {0} does not exist")]
    UnknownJob(String),
    #[error("{message}")]
    JobInvalid { field: String, message: String },
    #[error("{message}")]
    JobConflict { field: String, message: String },
    #[error("the orchestrator is shutting down")]
    Stopped,
}

/// A change the engine carries out: the fleet's part of a [`Command`](crate::core::command::Command).
#[derive(Debug)]
pub enum FleetChange {
    /// With the author of its first release.
    CreateApp(AppSpec, String),
    /// With the author of the release it makes.
    UpdateApp(AppSpec, String),
    /// Create the app, or with `replace` also replace an existing one's
    /// spec (`apps import`); with the author of the release it makes.
    ImportApp {
        spec: AppSpec,
        replace: bool,
        author: String,
    },
    DeleteApp(Name),
    Apply {
        device: DeviceId,
        app: Name,
        op: Op,
    },
    SetLabels {
        device: DeviceId,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        replace: bool,
    },
    /// Puts `app` at `release` (0: latest) on every device matching
    /// `selector` (valid, canonical).
    Assign {
        app: Name,
        selector: String,
        release: u64,
        run: RunState,
        author: String,
        /// What the command path read of the release's images.
        platforms: Vec<ImagePlatforms>,
    },
    Unassign(Name),
    ClearOverride {
        device: DeviceId,
        app: Name,
    },
    SetRegistry(RegistryCredential),
    DeleteRegistry(String),
    /// Starts a rollout (superseding the app's running one), by `author`.
    CreateRollout {
        request: contract::CreateRollout,
        author: String,
        /// What the command path read of the release's images.
        platforms: Vec<ImagePlatforms>,
        /// For an agent rollout: every agent release there is.
        agent_binaries: Vec<crate::core::records::AgentReleaseRecord>,
    },
    RolloutAction {
        id: String,
        action: contract::RolloutAction,
    },
    /// Starts an edge job on the devices its selector matches, by `author`.
    CreateJob {
        request: contract::CreateJob,
        author: String,
    },
    CancelJob {
        id: String,
    },
}

/// What a fleet change produced.
#[derive(Debug)]
pub enum Done {
    /// The app as stored; `created` unless it replaced an existing one.
    App {
        record: AppRecord,
        created: bool,
    },
    AppDeleted,
    Operation(OperationRecord),
    Device(Box<contract::Device>),
    /// How many devices' desired states changed.
    Reconciled(usize),
    Registry(contract::Registry),
    RegistryDeleted,
    Rollout(Box<contract::Rollout>),
    Job(Box<contract::Job>),
}

type Read = Box<dyn FnOnce(&Fleet, &SecretsBook) + Send>;
type ReadRollouts = Box<dyn FnOnce(&rollouts::Rollouts) + Send>;
type ReadJobs = Box<dyn FnOnce(&jobs::Jobs) + Send>;

enum Input {
    Change {
        change: FleetChange,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    },
    Read(Read),
    ReadRollouts(ReadRollouts),
    ReadJobs(ReadJobs),
    Shutdown(oneshot::Sender<()>),
}

/// A cheap handle to the engine, for every surface.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Input>,
    changes: broadcast::Sender<Arc<Change>>,
}

impl EngineHandle {
    /// Carries out a change; returns when it is durable and published.
    pub async fn change(&self, change: FleetChange) -> Result<Done, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Change { change, reply })
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Runs `f` on the engine's state and returns its answer. Keep it
    /// short: the engine does nothing else meanwhile.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Fleet, &SecretsBook) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let read: Read = Box::new(move |fleet, secrets| {
            let _ = tx.send(f(fleet, secrets));
        });
        self.tx
            .send(Input::Read(read))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Follows every change from now on.
    /// Shared (`Arc`): every subscriber gets the same change, and each of
    /// the channel's preallocated slots is one pointer.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Puts a change that happened outside the fleet (a rule firing) on
    /// the change stream, for every subscriber.
    pub fn announce(&self, change: Change) {
        let _ = self.changes.send(Arc::new(change));
    }

    /// Stops taking input, finishes the changes in flight (their writes
    /// committed or failed, their replies sent), and returns when the engine
    /// task has ended.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Input::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    // ----- typed reads ---------------------------------------------------

    pub async fn devices(&self) -> Result<Vec<contract::Device>, EngineError> {
        self.read(|f, _| f.device_views()).await
    }

    /// One page of the devices a query matches, and how many match.
    pub async fn device_page(
        &self,
        query: crate::core::fleet::DeviceQuery,
    ) -> Result<crate::core::fleet::DevicePage, EngineError> {
        self.read(move |f, _| f.device_page(&query)).await
    }

    pub async fn device(&self, id: DeviceId) -> Result<Option<contract::Device>, EngineError> {
        self.read(move |f, _| f.device_view(&id)).await
    }

    pub async fn apps(&self) -> Result<Vec<AppRecord>, EngineError> {
        self.read(|f, _| f.apps()).await
    }

    pub async fn app(&self, name: Name) -> Result<Option<AppRecord>, EngineError> {
        self.read(move |f, _| f.app(&name)).await
    }

    pub async fn operations(
        &self,
        device: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<OperationRecord>, EngineError> {
        self.read(move |f, _| f.operations(device.as_ref(), limit))
            .await
    }

    /// From memory only; see [`Commands::operation`] for the store fallback.
    pub async fn operation(&self, id: String) -> Result<Option<OperationRecord>, EngineError> {
        self.read(move |f, _| f.operation(&id)).await
    }

    /// Whether the device is known to the fleet.
    pub async fn has_device(&self, id: DeviceId) -> Result<bool, EngineError> {
        self.read(move |f, _| f.has_device(&id)).await
    }

    pub async fn events(
        &self,
        device: DeviceId,
        limit: usize,
    ) -> Result<Result<Vec<drover_shared::payload::DeviceEvent>, FleetError>, EngineError> {
        self.read(move |f, _| {
            f.events(&device, limit)
                .ok_or(FleetError::UnknownDevice(device))
        })
        .await
    }

    pub async fn registries(&self) -> Result<Vec<contract::Registry>, EngineError> {
        self.read(|_, s| s.views()).await
    }

    pub async fn registry(&self, host: String) -> Result<Option<contract::Registry>, EngineError> {
        self.read(move |_, s| s.view(&host)).await
    }

    pub async fn device_counts(&self) -> Result<(usize, usize), EngineError> {
        self.read(|f, _| f.device_counts()).await
    }

    /// The running agent rollouts that hand out the binary `digest`.
    pub async fn agent_rollouts_using(&self, digest: String) -> Result<Vec<String>, EngineError> {
        self.read_rollouts(move |r| r.agent_rollouts_using(&digest))
            .await
    }

    async fn read_rollouts<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rollouts::Rollouts) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let read: ReadRollouts = Box::new(move |r| {
            let _ = tx.send(f(r));
        });
        self.tx
            .send(Input::ReadRollouts(read))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Newest first; only `app`'s when given.
    pub async fn rollouts(&self, app: Option<Name>) -> Result<Vec<contract::Rollout>, EngineError> {
        self.read_rollouts(move |r| r.list(app.as_ref())).await
    }

    pub async fn rollout(&self, id: String) -> Result<Option<contract::Rollout>, EngineError> {
        self.read_rollouts(move |r| r.get(&id)).await
    }

    async fn read_jobs<T: Send + 'static>(
        &self,
        f: impl FnOnce(&jobs::Jobs) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let read: ReadJobs = Box::new(move |j| {
            let _ = tx.send(f(j));
        });
        self.tx
            .send(Input::ReadJobs(read))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Edge jobs, newest first, without their devices.
    pub async fn jobs(&self) -> Result<Vec<contract::Job>, EngineError> {
        self.read_jobs(|j| j.list()).await
    }

    /// One edge job with every device.
    pub async fn job(&self, id: String) -> Result<Option<contract::Job>, EngineError> {
        self.read_jobs(move |j| j.get(&id)).await
    }

    /// A rollout's devices (`None`: no such rollout).
    pub async fn rollout_devices(
        &self,
        id: String,
        state: Option<contract::RolloutDeviceState>,
        batch: Option<usize>,
        offset: usize,
        limit: usize,
    ) -> Result<Option<Vec<contract::RolloutDevice>>, EngineError> {
        self.read_rollouts(move |r| r.devices(&id, state, batch, offset, limit))
            .await
    }
}

/// What to do once a change's writes are durable.
/// Each carries what memory held before, to undo the change if its
/// writes fail.
enum Then {
    App {
        reply: oneshot::Sender<Result<Done, EngineError>>,
        record: AppRecord,
        previous: Option<AppRecord>,
    },
    AppDeleted {
        reply: oneshot::Sender<Result<Done, EngineError>>,
        name: Name,
        previous: Option<AppRecord>,
    },
    Apply {
        reply: oneshot::Sender<Result<Done, EngineError>>,
        op: OperationRecord,
        desired: DesiredState,
        previous: Option<DesiredState>,
        previous_placement: Option<Placement>,
    },
    /// Devices moved by an assignment, a relabelling or a release change:
    /// publish their desired states once durable. `reply` when an
    /// operator asked, with `done`.
    Reconciled {
        reply: Option<oneshot::Sender<Result<Done, EngineError>>>,
        done: Option<Done>,
        devices: Vec<DeviceId>,
        /// Rollouts stored with it: announced once durable.
        rollouts: Vec<String>,
    },
    Labels {
        reply: oneshot::Sender<Result<Done, EngineError>>,
        device: DeviceId,
        previous: BTreeMap<String, String>,
    },
    Registry {
        reply: oneshot::Sender<Result<Done, EngineError>>,
        view: Option<contract::Registry>,
        host: String,
        previous: Option<RegistryRecord>,
    },
    /// An edge job created or cancelled: tell the devices once durable.
    Job {
        reply: oneshot::Sender<Result<Done, EngineError>>,
        id: String,
        created: bool,
        /// Devices to send `CancelJob`.
        stop: Vec<DeviceId>,
    },
}

impl Then {
    fn reply(self) -> Option<oneshot::Sender<Result<Done, EngineError>>> {
        match self {
            Then::App { reply, .. }
            | Then::AppDeleted { reply, .. }
            | Then::Apply { reply, .. }
            | Then::Labels { reply, .. }
            | Then::Registry { reply, .. }
            | Then::Job { reply, .. } => Some(reply),
            Then::Reconciled { reply, .. } => reply,
        }
    }
}

type Durable = Pin<Box<dyn Future<Output = (Then, Result<(), StoreError>)> + Send>>;

pub struct Engine {
    fleet: Fleet,
    secrets: SecretsBook,
    store: Store,
    writer: StoreWriter,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    identities: Arc<Identities>,
    access: Arc<Access>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Changes applied to memory whose writes are not yet durable, in the
    /// order they were queued (the writer commits in that order).
    pending: FuturesOrdered<Durable>,
    /// A write failed: once nothing is pending, reload from the store.
    reload: bool,
    /// A device whose heartbeats announce no interval counts as offline
    /// after this long without a live message.
    offline_after: Duration,
    rollouts: rollouts::Rollouts,
    jobs: jobs::Jobs,
    /// Where devices' fetches of agent binaries go (`None`: not served).
    blobs: Option<agent_releases::BlobServer>,
}

impl Engine {
    /// Loads the fleet from the store and starts the engine task.
    #[allow(clippy::too_many_arguments)] // each is a distinct collaborator
    pub fn spawn(
        store: Store,
        writer: StoreWriter,
        outbox: Outbox,
        link: mpsc::Receiver<Event>,
        metrics: Arc<Metrics>,
        identities: Arc<Identities>,
        access: Arc<Access>,
        offline_after: Duration,
        blobs: Option<agent_releases::BlobServer>,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), StoreError> {
        let (fleet, secrets, rollout_records) = load(&store)?;
        let job_records = store.jobs()?;
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let engine = Engine {
            fleet,
            secrets,
            store,
            writer,
            outbox,
            metrics,
            identities,
            access,
            changes: changes.clone(),
            pending: FuturesOrdered::new(),
            reload: false,
            offline_after,
            rollouts: rollouts::Rollouts::default(),
            jobs: jobs::Jobs::load(job_records),
            blobs,
        };
        let mut engine = engine;
        engine.restore_rollouts(rollout_records);
        let task = tokio::spawn(engine.run(rx, link));
        Ok((EngineHandle { tx, changes }, task))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut link: mpsc::Receiver<Event>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        // Often enough that a silent device goes offline within a few
        // seconds of its deadline.
        let mut expiry = tokio::time::interval(
            (self.offline_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5)),
        );
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reload_at = tokio::time::Instant::now();
        let mut rollout_tick = tokio::time::interval(rollouts::TICK);
        rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.resume_rollouts().await;
        loop {
            if self.reload
                && self.pending.is_empty()
                && tokio::time::Instant::now() >= reload_at
                && !self.reload_from_store().await
            {
                reload_at = tokio::time::Instant::now() + Duration::from_millis(500);
            }
            if shutdown.is_some() && self.pending.is_empty() {
                break;
            }
            tokio::select! {
                // Durable writes first: they free replies and publishes.
                biased;
                Some((then, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    self.after_write(then, result).await;
                }
                Some(event) = link.recv(), if shutdown.is_none() => self.on_link_event(event).await,
                _ = tokio::time::sleep_until(reload_at), if self.reload && self.pending.is_empty() => {}
                _ = rollout_tick.tick(), if shutdown.is_none() && !self.reload => {
                    self.rollouts_tick().await;
                    self.jobs_tick().await;
                }
                _ = expiry.tick(), if shutdown.is_none() => {
                    let fx = self
                        .fleet
                        .expire(now_ms(), self.offline_after.as_millis() as u64);
                    for change in fx.changes {
                        if let Change::Device { device, .. } = &change {
                            info!(device = %device, "device offline: no heartbeat for too long");
                        }
                        self.emit(change);
                    }
                    self.record(fx.writes).await;
                }
                input = rx.recv(), if shutdown.is_none() => match input {
                    Some(Input::Change { change, reply }) => self.on_change(change, reply).await,
                    Some(Input::Read(read)) => read(&self.fleet, &self.secrets),
                    Some(Input::ReadRollouts(read)) => read(&self.rollouts),
                    Some(Input::ReadJobs(read)) => read(&self.jobs),
                    Some(Input::Shutdown(done)) => {
                        info!(in_flight = self.pending.len(), "engine stopping: finishing changes in flight");
                        shutdown = Some(done);
                    }
                    None => break,
                },
            }
        }
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
        info!("engine stopped");
    }

    fn rollout_running(&self, app: &Name) -> EngineError {
        EngineError::RolloutConflict {
            field: "app".into(),
            message: format!(
                "rollout {} of app {app} is running; wait for it, or abort or roll it back first",
                self.rollouts.running(app).unwrap_or_default()
            ),
        }
    }

    fn emit(&self, change: Change) {
        // No subscriber is not an error.
        let _ = self.changes.send(Arc::new(change));
    }

    async fn queue(&mut self, writes: Vec<Write>, then: Then) {
        let durable = self.writer.submit(writes).await;
        self.pending
            .push_back(Box::pin(async move { (then, durable.await) }));
    }

    // ----- operator changes ----------------------------------------------

    async fn on_change(
        &mut self,
        change: FleetChange,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        if self.reload {
            let _ = reply.send(Err(EngineError::Recovering));
            return;
        }
        let now = now_ms();
        match change {
            FleetChange::CreateApp(spec, author) => {
                let checked = self.fleet.create_app(spec, &author, now);
                self.put_app(checked, reply).await;
            }
            FleetChange::UpdateApp(spec, author) => {
                let checked = self.fleet.update_app(spec, &author, now);
                self.put_app(checked, reply).await;
            }
            FleetChange::ImportApp {
                spec,
                replace,
                author,
            } => {
                let checked = self.fleet.import_app(spec, replace, &author, now);
                self.put_app(checked, reply).await;
            }
            FleetChange::DeleteApp(name) if self.rollouts.running(&name).is_some() => {
                let _ = reply.send(Err(self.rollout_running(&name)));
            }
            FleetChange::Assign { app, .. } | FleetChange::Unassign(app)
                if self.rollouts.running(&app).is_some() =>
            {
                let _ = reply.send(Err(self.rollout_running(&app)));
            }
            FleetChange::CreateRollout {
                request,
                author,
                platforms,
                agent_binaries,
            } => {
                self.create_rollout(request, author, platforms, agent_binaries, reply)
                    .await;
            }
            FleetChange::RolloutAction { id, action } => {
                self.rollout_action(id, action, reply).await;
            }
            FleetChange::CreateJob { request, author } => {
                self.create_job(request, author, reply).await;
            }
            FleetChange::CancelJob { id } => self.cancel_job(id, reply).await,
            FleetChange::DeleteApp(name) => match self.fleet.delete_app(&name) {
                Ok(writes) => {
                    let previous = self.fleet.app(&name);
                    self.fleet.remove_app(&name);
                    self.queue(
                        writes,
                        Then::AppDeleted {
                            reply,
                            name,
                            previous,
                        },
                    )
                    .await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            FleetChange::Apply { device, app, op } => {
                let id = uuid::Uuid::new_v4().to_string();
                match self.fleet.request(&device, op, &app, id, now) {
                    Ok((desired, placement, op, writes)) => {
                        let previous = self.fleet.desired(&device).cloned();
                        let previous_placement = self.fleet.placement(&device).cloned();
                        self.fleet
                            .commit_request(desired.clone(), placement, op.clone());
                        // Deployed or removed by hand: no longer the rollout's.
                        if matches!(op.op, Op::Deploy | Op::Remove) {
                            self.rollouts_relabelled(&device, Some(&app)).await;
                        }
                        self.queue(
                            writes,
                            Then::Apply {
                                reply,
                                op,
                                desired,
                                previous,
                                previous_placement,
                            },
                        )
                        .await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            FleetChange::SetLabels {
                device,
                set,
                remove,
                replace,
            } => match self.fleet.set_labels(&device, &set, &remove, replace) {
                Ok((record, mut writes)) => {
                    let previous = self.fleet.operator_labels(&device).unwrap_or_default();
                    self.fleet.put_device_labels(&device, record.labels);
                    self.rollouts_relabelled(&device, None).await;
                    // Relabelled into or out of an assignment's selector:
                    // the device's desired state changes in the same write.
                    if let Some(u) = self.fleet.reconcile_device(&device) {
                        let (w, _) = self.fleet.apply_updates(std::slice::from_ref(&u));
                        writes.extend(w);
                        // Undoing means reloading: the labels and the
                        // desired state go back together.
                        self.queue(
                            writes,
                            Then::Reconciled {
                                reply: Some(reply),
                                done: None,
                                devices: vec![device],
                                rollouts: Vec::new(),
                            },
                        )
                        .await;
                        return;
                    }
                    self.queue(
                        writes,
                        Then::Labels {
                            reply,
                            device,
                            previous,
                        },
                    )
                    .await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            FleetChange::Assign {
                app,
                selector,
                release,
                run,
                author,
                platforms,
            } => match self
                .fleet
                .assign(&app, selector, release, run, &author, platforms, now)
            {
                Ok(record) => {
                    self.fleet.put_app(record.clone());
                    let updates = self.fleet.reconcile_app(&app);
                    let (mut writes, _) = self.fleet.apply_updates(&updates);
                    writes.push(Write::App(record.clone()));
                    info!(app = %app, devices = updates.len(), "assignment set");
                    self.queue(
                        writes,
                        Then::Reconciled {
                            reply: Some(reply),
                            done: Some(Done::App {
                                record,
                                created: false,
                            }),
                            devices: updates.into_iter().map(|u| u.device).collect(),
                            rollouts: Vec::new(),
                        },
                    )
                    .await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            FleetChange::Unassign(app) => {
                let Some(mut record) = self.fleet.app(&app) else {
                    let _ = reply.send(Err(FleetError::UnknownApp(app).into()));
                    return;
                };
                if record.assignment.take().is_none() {
                    let _ = reply.send(Err(FleetError::NotAssigned(app).into()));
                    return;
                }
                self.fleet.put_app(record.clone());
                let updates = self.fleet.reconcile_app(&app);
                let (mut writes, _) = self.fleet.apply_updates(&updates);
                writes.push(Write::App(record));
                info!(app = %app, devices = updates.len(), "assignment deleted");
                self.queue(
                    writes,
                    Then::Reconciled {
                        reply: Some(reply),
                        done: Some(Done::AppDeleted),
                        devices: updates.into_iter().map(|u| u.device).collect(),
                        rollouts: Vec::new(),
                    },
                )
                .await;
            }
            FleetChange::ClearOverride { device, app } => {
                match self.fleet.clear_override(&device, &app) {
                    Ok(placement) => {
                        let before = self.fleet.placement(&device).cloned().unwrap_or_default();
                        self.fleet.put_placement(&device, placement.clone());
                        let mut devices = Vec::new();
                        let writes = match self.fleet.reconcile_device(&device) {
                            Some(u) => {
                                devices.push(device.clone());
                                self.fleet.apply_updates(std::slice::from_ref(&u)).0
                            }
                            None if before != placement => {
                                let state =
                                    self.fleet.desired(&device).cloned().unwrap_or_default();
                                vec![Write::Desired(crate::core::records::DesiredRecord {
                                    device: device.clone(),
                                    state,
                                    placement,
                                })]
                            }
                            None => Vec::new(),
                        };
                        self.queue(
                            writes,
                            Then::Reconciled {
                                reply: Some(reply),
                                done: None,
                                devices,
                                rollouts: Vec::new(),
                            },
                        )
                        .await;
                        let _ = device;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            FleetChange::SetRegistry(credential) => {
                let record = RegistryRecord {
                    credential,
                    updated_at_ms: now,
                };
                let view = contract::Registry::from(&record);
                let host = record.credential.host.clone();
                let previous = self.secrets.record(&host);
                self.secrets.put(record.clone());
                self.queue(
                    vec![Write::Registry(record)],
                    Then::Registry {
                        reply,
                        view: Some(view),
                        host,
                        previous,
                    },
                )
                .await;
            }
            FleetChange::DeleteRegistry(host) => {
                let previous = self.secrets.record(&host);
                if !self.secrets.remove(&host) {
                    let _ = reply.send(Err(EngineError::UnknownRegistry(host)));
                    return;
                }
                self.queue(
                    vec![Write::DeleteRegistry(host.clone())],
                    Then::Registry {
                        reply,
                        view: None,
                        host,
                        previous,
                    },
                )
                .await;
            }
        }
    }

    /// A new or replaced app, checked by the fleet: in memory now, durable
    /// before the reply. What it replaces (nothing for a new app) is kept
    /// to undo it if the write fails.
    async fn put_app(
        &mut self,
        checked: Result<(AppRecord, Vec<Write>), FleetError>,
        reply: oneshot::Sender<Result<Done, EngineError>>,
    ) {
        match checked {
            Ok((record, writes)) => {
                let previous = self.fleet.app(&record.spec.name);
                self.fleet.put_app(record.clone());
                self.queue(
                    writes,
                    Then::App {
                        reply,
                        record,
                        previous,
                    },
                )
                .await;
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// A change's writes are durable (or failed): publish and reply.
    async fn after_write(&mut self, then: Then, result: Result<(), StoreError>) {
        if let Err(e) = result {
            self.after_failed_write(then, e).await;
            return;
        }
        match then {
            Then::App {
                reply,
                record,
                previous,
            } => {
                info!(app = %record.spec.name, "app stored");
                self.emit(Change::App {
                    name: record.spec.name.clone(),
                    deleted: false,
                });
                let _ = reply.send(Ok(Done::App {
                    record,
                    created: previous.is_none(),
                }));
            }
            Then::AppDeleted { reply, name, .. } => {
                info!(app = %name, "app deleted");
                self.emit(Change::App {
                    name,
                    deleted: true,
                });
                let _ = reply.send(Ok(Done::AppDeleted));
            }
            Then::Apply {
                reply, op, desired, ..
            } => {
                let device = op.device.clone();
                info!(device = %device, app = %op.app, op = op.op.as_str(), generation = desired.generation, operation = %op.id, "desired state changed");
                // The credentials the new desired state needs go out before it does.
                self.sync_secrets(Some(std::slice::from_ref(&device)), false);
                // Retained desired state first: it is what a reconnecting
                // device reads. The command carries the same state plus the
                // id to ack.
                let cmd = DeviceCommand {
                    id: op.id.clone(),
                    issued_at_ms: op.created_at_ms,
                    action: Action::Apply {
                        op: op.op,
                        app: op.app.clone(),
                        desired: desired.clone(),
                    },
                };
                let sent = self.publish_desired(&device, &desired)
                    && self.outbox.publish(&device, TopicKind::Cmd, encode(&cmd));
                let mut op = op;
                if sent {
                    if let Some(Write::Operation(marked)) = self.fleet.mark_sent(&op.id, now_ms()) {
                        op = marked.clone();
                        self.record(vec![Write::Operation(marked)]).await;
                    }
                }
                self.emit(Change::Operation {
                    operation: Box::new((&op).into()),
                });
                let _ = reply.send(Ok(Done::Operation(op)));
            }
            Then::Labels { reply, device, .. } => {
                info!(device = %device, "operator labels changed");
                self.emit(Change::Inventory {
                    device: device.clone(),
                    at_ms: now_ms(),
                });
                let reply_to = match self.fleet.device_view(&device) {
                    Some(v) => Ok(Done::Device(Box::new(v))),
                    None => Err(EngineError::Fleet(FleetError::UnknownDevice(device))),
                };
                let _ = reply.send(reply_to);
            }
            Then::Reconciled {
                reply,
                done,
                devices,
                rollouts,
            } => {
                if !devices.is_empty() {
                    self.sync_secrets(Some(&devices), false);
                    for id in &devices {
                        if let Some(state) = self.fleet.desired(id).cloned() {
                            self.publish_desired(id, &state);
                        }
                        self.emit(Change::Inventory {
                            device: id.clone(),
                            at_ms: now_ms(),
                        });
                    }
                }
                self.announce_rollouts(&rollouts);
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(done.unwrap_or(Done::Reconciled(devices.len()))));
                }
            }
            Then::Job {
                reply,
                id,
                created,
                stop,
            } => self.job_durable(reply, &id, created, &stop),
            Then::Registry { reply, view, .. } => {
                match &view {
                    Some(v) => {
                        info!(host = ?v.host, username = ?v.username, "registry credentials stored")
                    }
                    None => info!("registry credentials deleted"),
                }
                self.sync_secrets(None, false);
                let _ = reply.send(Ok(match view {
                    Some(v) => Done::Registry(v),
                    None => Done::RegistryDeleted,
                }));
            }
        }
    }

    /// A change's writes failed, and with it, most likely, every change
    /// queued after it. Waits for those, then undoes the failed ones in
    /// reverse order, so memory is again what the file holds and reads
    /// stay true while the store recovers. Should a later change have been
    /// stored after all, undoing by hand could be wrong: the engine reloads
    /// from the file instead.
    async fn after_failed_write(&mut self, first: Then, e: StoreError) {
        error!(error = %e, "store write failed; the change is undone");
        let mut settled = vec![(first, Err(e))];
        while let Some(next) = self.pending.next().await {
            settled.push(next);
        }
        if settled.iter().any(|(_, r)| r.is_ok()) {
            self.reload = true;
        }
        let mut ok = Vec::new();
        for (then, result) in settled.into_iter().rev() {
            match result {
                Ok(()) => ok.push(then),
                Err(e) => {
                    if !self.reload {
                        self.undo(&then);
                    }
                    if let Some(reply) = then.reply() {
                        let _ = reply.send(Err(EngineError::Store(e)));
                    }
                }
            }
        }
        for then in ok.into_iter().rev() {
            Box::pin(self.after_write(then, Ok(()))).await;
        }
    }

    fn undo(&mut self, then: &Then) {
        match then {
            Then::App {
                record, previous, ..
            } => self.fleet.restore_app(&record.spec.name, previous.clone()),
            Then::AppDeleted { name, previous, .. } => {
                self.fleet.restore_app(name, previous.clone())
            }
            Then::Apply {
                op,
                previous,
                previous_placement,
                ..
            } => self.fleet.undo_request(
                &op.device,
                previous.clone(),
                previous_placement.clone(),
                &op.id,
            ),
            // Many devices and maybe an app record: the file is the truth.
            Then::Reconciled { .. } | Then::Job { .. } => self.reload = true,
            Then::Labels {
                device, previous, ..
            } => self.fleet.put_device_labels(device, previous.clone()),
            Then::Registry { host, previous, .. } => match previous {
                Some(rec) => self.secrets.put(rec.clone()),
                None => {
                    self.secrets.remove(host);
                }
            },
        }
    }

    /// After a failed write: memory may hold changes that never reached
    /// the file. The file is the truth; read it again.
    /// `false` when it must be tried again later.
    async fn reload_from_store(&mut self) -> bool {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || {
            let (f, s, r) = load(&store)?;
            Ok::<_, StoreError>((f, s, r, store.jobs()?))
        })
        .await
        {
            Ok(Ok((fleet, secrets, rollouts, jobs))) => {
                self.fleet = fleet;
                self.secrets = secrets;
                self.restore_rollouts(rollouts);
                self.jobs = jobs::Jobs::load(jobs);
                self.reload = false;
                warn!("engine state reloaded from the store after a failed write");
                self.resume_rollouts().await;
                true
            }
            Ok(Err(e)) => {
                // Stay in recovery: changes are refused until it works;
                // reads and device messages go on meanwhile.
                debug!(error = %e, "reloading from the store failed; trying again");
                false
            }
            Err(e) => {
                error!(error = %e, "reload task failed");
                false
            }
        }
    }

    /// Queues writes of device observations without waiting: they are the
    /// agent's facts, re-sent with its next report if this one were lost,
    /// and the engine must not stall on an fsync per message.
    async fn record(&mut self, writes: Vec<Write>) {
        if !writes.is_empty() && !self.writer.record(writes).await {
            warn!("the store writer has stopped; device report not stored");
        }
    }

    // ----- device side -----------------------------------------------------

    async fn on_link_event(&mut self, event: Event) {
        match event {
            Event::Connected => self.republish_all(),
            Event::Device { id, msg, retained } => {
                let span = info_span!("device", device = %id);
                self.on_device_message(id, *msg, retained)
                    .instrument(span)
                    .await;
            }
            Event::Job { id, report } => {
                if !self.reload {
                    self.job_report(&id, &report);
                }
            }
            Event::Enroll { id, request } => {
                // Stores a credential (an fsync): off the engine.
                let span = info_span!("enroll", device = %id);
                tokio::spawn(
                    enroll(
                        id,
                        request,
                        self.identities.clone(),
                        self.access.clone(),
                        self.metrics.clone(),
                        self.outbox.clone(),
                    )
                    .instrument(span),
                );
            }
            Event::Fetch { id, request } => {
                if let Some(blobs) = &self.blobs {
                    blobs.offer(id, request);
                }
            }
        }
    }

    async fn on_device_message(&mut self, id: DeviceId, msg: DeviceMessage, retained: bool) {
        let state_report = matches!(msg, DeviceMessage::State(_));
        let fx = if retained {
            self.fleet.on_retained_message(&id, msg, now_ms())
        } else {
            self.fleet.on_device_message(&id, msg, now_ms())
        };
        if fx.republish {
            if let Some(state) = self.fleet.desired(&id).cloned() {
                // Credentials first, so a device never pulls without them.
                self.sync_secrets(Some(std::slice::from_ref(&id)), true);
                self.publish_desired(&id, &state);
            }
        }
        if fx.resync {
            let cmd = DeviceCommand {
                id: uuid::Uuid::new_v4().to_string(),
                issued_at_ms: now_ms(),
                action: Action::Resync,
            };
            self.outbox.publish(&id, TopicKind::Cmd, encode(&cmd));
        }
        let hello = fx
            .changes
            .iter()
            .any(|c| matches!(c, Change::Inventory { .. }));
        for change in fx.changes {
            self.emit(change);
        }
        self.record(fx.writes).await;
        // An agent rollout also watches hellos (the binary's digest).
        if (state_report || hello) && !self.reload {
            self.rollouts_observe(&id).await;
        }
        // A device that enrolled, or came back with labels of its own, gets
        // (or loses) what the assignments say, durably before it is told.
        if hello && !self.reload {
            self.jobs_device_online(&id);
            self.rollouts_relabelled(&id, None).await;
            if let Some(u) = self.fleet.reconcile_device(&id) {
                let (writes, _) = self.fleet.apply_updates(std::slice::from_ref(&u));
                self.queue(
                    writes,
                    Then::Reconciled {
                        reply: None,
                        done: None,
                        devices: vec![id],
                        rollouts: Vec::new(),
                    },
                )
                .await;
            }
        }
    }

    fn publish_desired(&self, device: &DeviceId, state: &DesiredState) -> bool {
        self.outbox.publish(
            device,
            TopicKind::Desired,
            encode(&Desired {
                state: state.clone(),
            }),
        )
    }

    /// After (re)connecting to the broker, every device's desired state is
    /// published again, retained: an embedded broker restarted with the
    /// orchestrator has lost all retained messages.
    fn republish_all(&mut self) {
        self.sync_secrets(None, true);
        let mut n = 0;
        for (id, state) in self.fleet.all_desired() {
            self.publish_desired(id, state);
            n += 1;
        }
        info!(devices = n, "republished desired states");
    }

    /// Publishes to each device (all with a desired state, or `devices`)
    /// the registry credentials its desired state needs, when that set
    /// changed since it was last sent, or always with `force`.
    fn sync_secrets(&mut self, devices: Option<&[DeviceId]>, force: bool) {
        let now = now_ms();
        let mut due = Vec::new();
        match devices {
            Some(ids) => {
                for id in ids {
                    if let Some(state) = self.fleet.desired(id) {
                        if let Some(s) = self.secrets.next_for(id, state, force, now) {
                            due.push((id.clone(), s));
                        }
                    }
                }
            }
            None => {
                for (id, state) in self.fleet.all_desired() {
                    if let Some(s) = self.secrets.next_for(id, state, force, now) {
                        due.push((id.clone(), s));
                    }
                }
            }
        }
        for (id, secrets) in due {
            let hosts = secrets.hosts().join(",");
            if self
                .outbox
                .publish(&id, TopicKind::Secrets, encode(&secrets))
            {
                debug!(device = %id, registries = %hosts, "registry credentials published");
            } else {
                self.secrets.unsend(&id);
            }
        }
    }
}

fn load(
    store: &Store,
) -> Result<(Fleet, SecretsBook, Vec<crate::core::records::RolloutRecord>), StoreError> {
    let fleet = Fleet::load(
        store.devices()?,
        store.apps()?,
        store.desired()?,
        store.operations()?,
    );
    Ok((
        fleet,
        SecretsBook::load(store.registries()?),
        store.rollouts()?,
    ))
}

/// Answers an enrollment request on the device's `enrolled` topic, which
/// only that device may read. The password is in that message and nowhere
/// else.
async fn enroll(
    id: DeviceId,
    request: EnrollRequest,
    identities: Arc<Identities>,
    access: Arc<Access>,
    metrics: Arc<Metrics>,
    outbox: Outbox,
) {
    let actor = crate::core::command::Actor::Device(id.clone());
    let outcome = match identities.enroll(&id, request.token.expose()).await {
        Ok(password) => {
            metrics.enrollments_accepted.inc();
            info!("device enrolled");
            access
                .audit(
                    &actor,
                    "mqtt enroll".into(),
                    None,
                    AuditOutcome::Ok,
                    None,
                    String::new(),
                )
                .await;
            EnrollOutcome::Accepted {
                password: Secret::new(password),
            }
        }
        Err(refusal) => {
            metrics.enrollments_refused.inc();
            warn!(reason = %refusal, "enrollment refused");
            access
                .audit(
                    &actor,
                    "mqtt enroll".into(),
                    None,
                    AuditOutcome::Denied,
                    None,
                    refusal.to_string(),
                )
                .await;
            EnrollOutcome::Refused {
                reason: refusal.to_string(),
            }
        }
    };
    let answer = Enrolled {
        request_id: request.request_id,
        outcome,
    };
    outbox.publish(&id, TopicKind::Enrolled, encode(&answer));
}

#[cfg(test)]
mod tests {
    use drover_shared::payload::{HostMetrics, Status, Telemetry};
    use drover_shared::topic::Topics;

    use super::*;

    pub(super) struct Fixture {
        pub(super) engine: EngineHandle,
        pub(super) link: mpsc::Sender<Event>,
        /// The engine's store, to look at what is durable.
        pub(super) store: Store,
        _dir: tempfile::TempDir,
    }

    /// An engine on a real redb file, with an MQTT client that is never
    /// connected (publishes queue in its request channel).
    pub(super) fn engine() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("e.redb")).expect("store");
        let metrics = Arc::new(Metrics::default());
        let writer = StoreWriter::spawn(store.clone(), metrics.clone());
        let topics = Topics::default();
        let identities = Arc::new(
            Identities::load(store.clone(), writer.clone(), topics.clone()).expect("identities"),
        );
        let access = Arc::new(Access::load(store.clone(), writer.clone()).expect("access"));
        let opts = rumqttc::MqttOptions::new("t", "127.0.0.1", 9);
        let (client, _eventloop) = rumqttc::AsyncClient::new(opts, 100_000);
        let (outbox, _) = Outbox::spawn(client, topics, metrics.clone());
        let (link, link_rx) = mpsc::channel(100);
        let (engine, _) = Engine::spawn(
            store.clone(),
            writer,
            outbox,
            link_rx,
            metrics,
            identities,
            access,
            Duration::from_secs(30),
            None,
        )
        .expect("engine");
        Fixture {
            engine,
            link,
            store,
            _dir: dir,
        }
    }

    fn telemetry(at_ms: u64) -> Event {
        Event::Device {
            id: DeviceId::new("pi-1").expect("id"),
            msg: Box::new(DeviceMessage::Telemetry(Telemetry {
                at_ms,
                host: HostMetrics::default(),
                containers: Vec::new(),
            })),
            retained: false,
        }
    }

    /// A subscriber that never reads does not slow the engine down: it
    /// loses the oldest changes and is told how many.
    #[tokio::test]
    async fn a_slow_subscriber_lags_and_never_slows_the_engine() {
        let f = engine();
        let mut slow = f.engine.subscribe();
        let mut fast = f.engine.subscribe();
        let id = DeviceId::new("pi-1").expect("id");
        f.link
            .send(Event::Device {
                id: id.clone(),
                msg: Box::new(DeviceMessage::Status(Status {
                    online: true,
                    at_ms: 1,
                })),
                retained: false,
            })
            .await
            .expect("send");
        let n = CHANGES_CAPACITY as u64 * 2;
        let reader = tokio::spawn(async move {
            let mut last = 0;
            while last < n {
                match fast.recv().await.as_deref() {
                    Ok(Change::Telemetry { telemetry, .. }) => last = telemetry.at_ms,
                    Ok(_) => {}
                    Err(e) => panic!("a subscriber that keeps up lost changes: {e}"),
                }
            }
        });
        for i in 1..=n {
            f.link.send(telemetry(i)).await.expect("send");
        }
        // Every message was applied although `slow` read nothing.
        let latest = f
            .engine
            .device(id)
            .await
            .expect("engine")
            .and_then(|d| d.telemetry)
            .map(|t| t.at_ms);
        assert_eq!(latest, Some(n));
        tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("the reader kept up")
            .expect("reader");
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                assert!(missed >= n - CHANGES_CAPACITY as u64, "missed {missed}")
            }
            other => panic!("expected to learn of the lag, got {other:?}"),
        }
        // After the lag it goes on with what is still there.
        assert!(slow.recv().await.is_ok());
    }

    /// A change is answered once it is durable, and its operation goes
    /// out on the change stream.
    #[tokio::test]
    async fn changes_are_durable_then_published_to_subscribers() {
        let f = engine();
        let mut changes = f.engine.subscribe();
        let spec: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "containers": [{"name": "main", "image": "127.0.0.1:5000/busybox:1"}]
        }))
        .expect("spec");
        let done = f
            .engine
            .change(FleetChange::CreateApp(spec.clone(), "t".into()))
            .await
            .expect("created");
        assert!(matches!(done, Done::App { created: true, .. }));
        assert!(matches!(
            f.engine
                .change(FleetChange::CreateApp(spec, "t".into()))
                .await,
            Err(EngineError::Fleet(FleetError::AppExists(_)))
        ));
        let id = DeviceId::new("pi-1").expect("id");
        f.link
            .send(Event::Device {
                id: id.clone(),
                msg: Box::new(DeviceMessage::Status(Status {
                    online: true,
                    at_ms: 1,
                })),
                retained: false,
            })
            .await
            .expect("send");
        let done = f
            .engine
            .change(FleetChange::Apply {
                device: id.clone(),
                app: Name::new("web").expect("name"),
                op: Op::Deploy,
            })
            .await
            .expect("deployed");
        let Done::Operation(op) = done else {
            panic!("expected an operation, got {done:?}")
        };
        assert_eq!(op.generation, 1);
        let mut seen = Vec::new();
        while let Ok(Ok(c)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), changes.recv()).await
        {
            seen.push(c);
        }
        assert!(
            seen.iter().any(
                |c| matches!(&**c, Change::App { name, deleted: false } if name.as_str() == "web")
            ),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|c| matches!(&**c, Change::Operation { operation } if operation.id == op.id)),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|c| matches!(&**c, Change::Device { online: true, .. })),
            "{seen:?}"
        );
        f.engine.shutdown().await;
        assert!(matches!(
            f.engine.devices().await,
            Err(EngineError::Stopped)
        ));
    }
}
