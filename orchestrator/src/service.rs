//! The service: owns the [`Fleet`] state machine, persists its writes to
//! redb before they take effect, and publishes to devices. The REST API and
//! the MQTT link both go through it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use drover_shared::model::{AppSpec, DesiredState};
use drover_shared::payload::{
    Action, Command, Desired, EnrollOutcome, EnrollRequest, Enrolled, Op, RegistryCredential,
    Secret,
};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{encode, DeviceId, Name};
use rumqttc::AsyncClient;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::access::Access;
use crate::fleet::{Fleet, FleetError};
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::mqtt::{qos, Event, OversizeLog};
use crate::records::{AppRecord, DeviceView, Operation};
use crate::registries::{RegistryRecord, RegistryView, SecretsBook};
use crate::store::{Store, StoreError, Write};
use crate::writer::StoreWriter;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("storing the change failed: {0}")]
    Store(#[from] StoreError),
}

pub struct Service {
    fleet: Mutex<Fleet>,
    /// Registry credentials. Lock order: `secrets` before `fleet`, never
    /// the other way round; it is held across publishing, so the sets a
    /// device is sent go out in the order they were computed.
    secrets: Mutex<SecretsBook>,
    store: Store,
    writer: StoreWriter,
    mqtt: AsyncClient,
    oversize: OversizeLog,
    topics: Topics,
    pub metrics: Arc<Metrics>,
    pub identities: Arc<Identities>,
    pub access: Arc<Access>,
}

impl Service {
    pub fn new(
        store: Store,
        mqtt: AsyncClient,
        topics: Topics,
        metrics: Arc<Metrics>,
        identities: Arc<Identities>,
        writer: StoreWriter,
    ) -> Result<Service, StoreError> {
        let access = Arc::new(Access::load(store.clone(), writer.clone())?);
        let fleet = Fleet::load(
            store.devices()?,
            store.apps()?,
            store.desired()?,
            store.operations()?,
        );
        let secrets = SecretsBook::load(store.registries()?);
        Ok(Service {
            fleet: Mutex::new(fleet),
            secrets: Mutex::new(secrets),
            store,
            writer,
            mqtt,
            oversize: OversizeLog::default(),
            topics,
            metrics,
            identities,
            access,
        })
    }

    /// Stores writes and waits until they are durable.
    async fn persist(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.writer.persist(writes).await
    }

    /// Queues writes of device observations without waiting: they are the
    /// agent's facts, re-sent with its next report if this one were lost,
    /// and the service loop must not stall on an fsync per message.
    async fn record(&self, writes: Vec<Write>) {
        if !self.writer.record(writes).await {
            warn!("the store writer has stopped; device report not stored");
        }
    }

    fn publish(&self, device: &DeviceId, kind: TopicKind, payload: Vec<u8>) -> bool {
        let topic = self.topics.device(device, kind);
        if !crate::mqtt::admit(&topic, qos(kind), &payload, &self.metrics, &self.oversize) {
            return false;
        }
        match self
            .mqtt
            .try_publish(topic, qos(kind), kind.retained(), payload)
        {
            Ok(()) => {
                self.metrics.mqtt_published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.metrics
                    .mqtt_publish_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(device = %device, %kind, error = %e, "publish not queued; the device will get it on resync");
                false
            }
        }
    }

    fn publish_desired(&self, device: &DeviceId, state: &DesiredState) -> bool {
        self.publish(
            device,
            TopicKind::Desired,
            encode(&Desired {
                state: state.clone(),
            }),
        )
    }

    /// The service loop: applies every event from the MQTT link in order.
    pub async fn run(self: Arc<Self>, mut events: mpsc::Receiver<Event>) {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Connected => self.republish_all().await,
                Event::Device { id, msg } => {
                    let span = info_span!("device", device = %id);
                    self.on_device_message(id, *msg).instrument(span).await;
                }
                Event::Enroll { id, request } => {
                    // Stores a credential (an fsync): off the loop.
                    let span = info_span!("enroll", device = %id);
                    tokio::spawn(self.clone().on_enroll(id, request).instrument(span));
                }
            }
        }
    }

    /// Answers an enrollment request on the device's `enrolled` topic,
    /// which only that device may read. The password is in that message and
    /// nowhere else.
    async fn on_enroll(self: Arc<Self>, id: DeviceId, request: EnrollRequest) {
        let outcome = match self.identities.enroll(&id, request.token.expose()).await {
            Ok(password) => {
                self.metrics
                    .enrollments_accepted
                    .fetch_add(1, Ordering::Relaxed);
                info!("device enrolled");
                self.access
                    .audit(
                        &format!("device:{id}"),
                        None,
                        "mqtt enroll".into(),
                        "ok",
                        None,
                        String::new(),
                    )
                    .await;
                EnrollOutcome::Accepted {
                    password: Secret::new(password),
                }
            }
            Err(refusal) => {
                self.metrics
                    .enrollments_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(reason = %refusal, "enrollment refused");
                self.access
                    .audit(
                        &format!("device:{id}"),
                        None,
                        "mqtt enroll".into(),
                        "denied",
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
        self.publish(&id, TopicKind::Enrolled, encode(&answer));
    }

    async fn on_device_message(&self, id: DeviceId, msg: crate::fleet::DeviceMessage) {
        let mut fleet = self.fleet.lock().await;
        let fx = fleet.on_device_message(&id, msg, now_ms());
        let republish = fx.republish.then(|| fleet.desired(&id).cloned()).flatten();
        drop(fleet);
        if let Some(state) = republish {
            // Credentials first, so a device never pulls without them.
            self.sync_secrets(Some(std::slice::from_ref(&id)), true, false)
                .await;
            self.publish_desired(&id, &state);
        }
        if fx.resync {
            let cmd = Command {
                id: uuid::Uuid::new_v4().to_string(),
                issued_at_ms: now_ms(),
                action: Action::Resync,
            };
            self.publish(&id, TopicKind::Cmd, encode(&cmd));
        }
        self.record(fx.writes).await;
    }

    /// After (re)connecting to the broker, every device's desired state is
    /// published again, retained: an embedded broker restarted with the
    /// orchestrator has lost all retained messages.
    async fn republish_all(&self) {
        self.sync_secrets(None, true, false).await;
        let fleet = self.fleet.lock().await;
        let mut n = 0;
        for (id, state) in fleet.all_desired() {
            self.publish_desired(id, state);
            n += 1;
        }
        info!(devices = n, "republished desired states");
    }

    /// Publishes to each device (all with a desired state, or `devices`)
    /// the registry credentials its desired state needs, when that set
    /// changed since it was last sent, or always with `force`. `wait`: wait
    /// for room in the MQTT queue (API requests) rather than give up at once
    /// (the service loop, which must not block on the link it feeds).
    async fn sync_secrets(&self, devices: Option<&[DeviceId]>, force: bool, wait: bool) {
        let mut book = self.secrets.lock().await;
        let now = now_ms();
        let due: Vec<(DeviceId, drover_shared::payload::Secrets)> = {
            let fleet = self.fleet.lock().await;
            let mut due = Vec::new();
            let mut offer = |id: &DeviceId, state: &DesiredState| {
                if let Some(s) = book.next_for(id, state, force, now) {
                    due.push((id.clone(), s));
                }
            };
            match devices {
                Some(ids) => {
                    for id in ids {
                        if let Some(state) = fleet.desired(id) {
                            offer(id, state);
                        }
                    }
                }
                None => {
                    for (id, state) in fleet.all_desired() {
                        offer(id, state);
                    }
                }
            }
            due
        };
        for (id, secrets) in due {
            let hosts = secrets.hosts().join(",");
            let payload = encode(&secrets);
            let sent = if wait {
                self.publish_waiting(&id, TopicKind::Secrets, payload).await
            } else {
                self.publish(&id, TopicKind::Secrets, payload)
            };
            if sent {
                debug!(device = %id, registries = %hosts, "registry credentials published");
            } else {
                book.unsend(&id);
            }
        }
    }

    // ----- API ---------------------------------------------------------------

    pub async fn devices(&self) -> Vec<DeviceView> {
        let mut views = self.fleet.lock().await.device_views();
        for v in &mut views {
            v.credential = Some(self.identities.credential_state(&v.id));
        }
        views
    }

    pub async fn device(&self, id: &DeviceId) -> Option<DeviceView> {
        let mut view = self.fleet.lock().await.device_view(id)?;
        view.credential = Some(self.identities.credential_state(id));
        Some(view)
    }

    pub async fn apps(&self) -> Vec<AppRecord> {
        self.fleet.lock().await.apps()
    }

    pub async fn app(&self, name: &Name) -> Option<AppRecord> {
        self.fleet.lock().await.app(name)
    }

    pub async fn create_app(&self, spec: AppSpec) -> Result<AppRecord, ServiceError> {
        let mut fleet = self.fleet.lock().await;
        let (rec, writes) = fleet.create_app(spec, now_ms())?;
        self.persist(writes).await?;
        fleet.put_app(rec.clone());
        info!(app = %rec.spec.name, "app created");
        Ok(rec)
    }

    pub async fn update_app(&self, spec: AppSpec) -> Result<AppRecord, ServiceError> {
        let mut fleet = self.fleet.lock().await;
        let (rec, writes) = fleet.update_app(spec, now_ms())?;
        self.persist(writes).await?;
        fleet.put_app(rec.clone());
        info!(app = %rec.spec.name, "app updated");
        Ok(rec)
    }

    pub async fn delete_app(&self, name: &Name) -> Result<(), ServiceError> {
        let mut fleet = self.fleet.lock().await;
        let writes = fleet.delete_app(name)?;
        self.persist(writes).await?;
        fleet.remove_app(name);
        info!(app = %name, "app deleted");
        Ok(())
    }

    /// Deploy, start, stop or remove: stored first, then published. Returns
    /// at once with the operation to follow.
    pub async fn request(
        &self,
        device: &DeviceId,
        op: Op,
        app: &Name,
    ) -> Result<Operation, ServiceError> {
        let mut fleet = self.fleet.lock().await;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let (desired, operation, writes) = fleet.request(device, op, app, id.clone(), now)?;
        self.persist(writes).await?;
        fleet.commit_request(desired.clone(), operation.clone());
        drop(fleet);
        info!(device = %device, app = %app, op = op.as_str(), generation = desired.generation, operation = %id, "desired state changed");
        // The credentials the new desired state needs go out before it does.
        self.sync_secrets(Some(std::slice::from_ref(device)), false, true)
            .await;
        // Retained desired state first: it is what a reconnecting device
        // reads. The command carries the same state plus the id to ack.
        // Outside the fleet lock, waiting for room in the MQTT queue: a burst
        // of requests slows down instead of dropping publishes.
        let cmd = Command {
            id: id.clone(),
            issued_at_ms: now,
            action: Action::Apply {
                op,
                app: app.clone(),
                desired: desired.clone(),
            },
        };
        let sent = self
            .publish_waiting(
                device,
                TopicKind::Desired,
                encode(&Desired { state: desired }),
            )
            .await
            && self
                .publish_waiting(device, TopicKind::Cmd, encode(&cmd))
                .await;
        if sent {
            let w = self.fleet.lock().await.mark_sent(&id, now_ms());
            if let Some(w) = w {
                if let Err(e) = self.persist(vec![w]).await {
                    warn!(error = %e, "could not store operation status");
                }
            }
        }
        Ok(self.operation(&id).await.unwrap_or(operation))
    }

    /// Publishes, waiting up to a few seconds for room in the client's
    /// queue; on time-out the device gets its state on the next resync.
    async fn publish_waiting(&self, device: &DeviceId, kind: TopicKind, payload: Vec<u8>) -> bool {
        let topic = self.topics.device(device, kind);
        if !crate::mqtt::admit(&topic, qos(kind), &payload, &self.metrics, &self.oversize) {
            return false;
        }
        let publish = self
            .mqtt
            .publish(topic, qos(kind), kind.retained(), payload);
        match tokio::time::timeout(std::time::Duration::from_secs(5), publish).await {
            Ok(Ok(())) => {
                self.metrics.mqtt_published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Err(e)) => {
                self.metrics
                    .mqtt_publish_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(device = %device, %kind, error = %e, "publish failed; the device will get it on resync");
                false
            }
            Err(_) => {
                self.metrics
                    .mqtt_publish_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(device = %device, %kind, "MQTT queue full for 5 s; the device will get it on resync");
                false
            }
        }
    }

    // ----- registry credentials -------------------------------------------

    pub async fn registries(&self) -> Vec<RegistryView> {
        self.secrets.lock().await.views()
    }

    pub async fn registry(&self, host: &str) -> Option<RegistryView> {
        self.secrets.lock().await.view(host)
    }

    /// Stores credentials for a (validated) registry host, then sends them
    /// to the devices whose desired apps pull from it.
    pub async fn set_registry(
        &self,
        credential: RegistryCredential,
    ) -> Result<RegistryView, ServiceError> {
        let rec = RegistryRecord {
            credential,
            updated_at_ms: now_ms(),
        };
        let view = RegistryView::from(&rec);
        {
            let mut book = self.secrets.lock().await;
            self.persist(vec![Write::Registry(rec.clone())]).await?;
            book.put(rec);
        }
        info!(host = %view.host, username = %view.username, "registry credentials stored");
        self.sync_secrets(None, false, true).await;
        Ok(view)
    }

    /// Deletes a registry's credentials; devices that had them get a set
    /// without them. `false` when there were none.
    pub async fn delete_registry(&self, host: &str) -> Result<bool, ServiceError> {
        {
            let mut book = self.secrets.lock().await;
            if book.view(host).is_none() {
                return Ok(false);
            }
            self.persist(vec![Write::DeleteRegistry(host.to_string())])
                .await?;
            book.remove(host);
        }
        info!(%host, "registry credentials deleted");
        self.sync_secrets(None, false, true).await;
        Ok(true)
    }

    /// From memory, or from redb for an old finished operation that was
    /// evicted from memory.
    pub async fn operation(&self, id: &str) -> Option<Operation> {
        if let Some(op) = self.fleet.lock().await.operation(id) {
            return Some(op);
        }
        let store = self.store.clone();
        let id = id.to_string();
        match tokio::task::spawn_blocking(move || store.operation(&id)).await {
            Ok(Ok(op)) => op,
            Ok(Err(e)) => {
                warn!(error = %e, "reading an operation from the store failed");
                None
            }
            Err(_) => None,
        }
    }

    pub async fn operations(&self, device: Option<&DeviceId>, limit: usize) -> Vec<Operation> {
        self.fleet.lock().await.operations(device, limit)
    }

    pub async fn logs(
        &self,
        device: &DeviceId,
        app: &Name,
        container: Option<&Name>,
        tail: usize,
    ) -> Result<Vec<drover_shared::payload::LogLine>, FleetError> {
        let fleet = self.fleet.lock().await;
        if fleet.device_view(device).is_none() {
            return Err(FleetError::UnknownDevice(device.clone()));
        }
        Ok(fleet.logs(device, app, container, tail))
    }

    pub async fn events(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<drover_shared::payload::DeviceEvent>, FleetError> {
        self.fleet
            .lock()
            .await
            .events(device, limit)
            .ok_or_else(|| FleetError::UnknownDevice(device.clone()))
    }

    pub async fn metrics_text(&self) -> String {
        let (total, online) = self.fleet.lock().await.device_counts();
        self.metrics.render(total, online)
    }
}
