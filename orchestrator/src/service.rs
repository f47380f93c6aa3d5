//! The service: owns the [`Fleet`] state machine, persists its writes to
//! redb before they take effect, and publishes to devices. The REST API and
//! the MQTT link both go through it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use drover_shared::model::{AppSpec, DesiredState};
use drover_shared::payload::{Action, Command, Desired, Op};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{encode, DeviceId, Name};
use rumqttc::AsyncClient;
use tokio::sync::{mpsc, Mutex};
use tracing::{info, info_span, warn, Instrument};

use crate::fleet::{Fleet, FleetError};
use crate::metrics::Metrics;
use crate::mqtt::{qos, Event};
use crate::records::{AppRecord, DeviceView, Operation};
use crate::store::{Store, StoreError, Write};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
    store: Store,
    mqtt: AsyncClient,
    topics: Topics,
    pub metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(store: Store, mqtt: AsyncClient, topics: Topics, metrics: Arc<Metrics>) -> Result<Service, StoreError> {
        let fleet = Fleet::load(store.devices()?, store.apps()?, store.desired()?, store.operations()?);
        Ok(Service { fleet: Mutex::new(fleet), store, mqtt, topics, metrics })
    }

    /// Runs a redb transaction on the blocking pool.
    async fn persist(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || store.write(&writes))
            .await
            .unwrap_or_else(|e| Err(StoreError::Db(format!("writer task failed: {e}"))));
        if res.is_err() {
            self.metrics.store_write_failed.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn publish(&self, device: &DeviceId, kind: TopicKind, payload: Vec<u8>) -> bool {
        let topic = self.topics.device(device, kind);
        match self.mqtt.try_publish(topic, qos(kind), kind.retained(), payload) {
            Ok(()) => {
                self.metrics.mqtt_published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.metrics.mqtt_publish_failed.fetch_add(1, Ordering::Relaxed);
                warn!(device = %device, %kind, error = %e, "publish not queued; the device will get it on resync");
                false
            }
        }
    }

    fn publish_desired(&self, device: &DeviceId, state: &DesiredState) -> bool {
        self.publish(device, TopicKind::Desired, encode(&Desired { state: state.clone() }))
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
            }
        }
    }

    async fn on_device_message(&self, id: DeviceId, msg: crate::fleet::DeviceMessage) {
        let mut fleet = self.fleet.lock().await;
        let fx = fleet.on_device_message(&id, msg, now_ms());
        if fx.republish {
            if let Some(state) = fleet.desired(&id) {
                self.publish_desired(&id, state);
            }
        }
        drop(fleet);
        // Observations are the agent's facts; losing one to a failed write
        // is healed by the next report, so it is logged, not fatal.
        if let Err(e) = self.persist(fx.writes).await {
            warn!(error = %e, "could not store device report");
        }
    }

    /// After (re)connecting to the broker, every device's desired state is
    /// published again, retained: an embedded broker restarted with the
    /// orchestrator has lost all retained messages.
    async fn republish_all(&self) {
        let fleet = self.fleet.lock().await;
        let mut n = 0;
        for (id, state) in fleet.all_desired() {
            self.publish_desired(id, state);
            n += 1;
        }
        info!(devices = n, "republished desired states");
    }

    // ----- API ---------------------------------------------------------------

    pub async fn devices(&self) -> Vec<DeviceView> {
        self.fleet.lock().await.device_views()
    }

    pub async fn device(&self, id: &DeviceId) -> Option<DeviceView> {
        self.fleet.lock().await.device_view(id)
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
    pub async fn request(&self, device: &DeviceId, op: Op, app: &Name) -> Result<Operation, ServiceError> {
        let mut fleet = self.fleet.lock().await;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let (desired, operation, writes) = fleet.request(device, op, app, id.clone(), now)?;
        self.persist(writes).await?;
        fleet.commit_request(desired.clone(), operation.clone());
        info!(device = %device, app = %app, op = op.as_str(), generation = desired.generation, operation = %id, "desired state changed");
        // Retained desired state first: it is what a reconnecting device
        // reads. The command carries the same state plus the id to ack.
        let sent = self.publish_desired(device, &desired)
            && self.publish(
                device,
                TopicKind::Cmd,
                encode(&Command {
                    id: id.clone(),
                    issued_at_ms: now,
                    action: Action::Apply { op, app: app.clone(), desired },
                }),
            );
        if sent {
            if let Some(w) = fleet.mark_sent(&id, now_ms()) {
                drop(fleet);
                if let Err(e) = self.persist(vec![w]).await {
                    warn!(error = %e, "could not store operation status");
                }
                return Ok(self.operation(&id).await.unwrap_or(operation));
            }
        }
        Ok(fleet.operation(&id).unwrap_or(operation))
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

    pub async fn events(&self, device: &DeviceId, limit: usize) -> Result<Vec<drover_shared::payload::DeviceEvent>, FleetError> {
        self.fleet.lock().await.events(device, limit).ok_or_else(|| FleetError::UnknownDevice(device.clone()))
    }

    pub async fn metrics_text(&self) -> String {
        let fleet = self.fleet.lock().await;
        let views = fleet.device_views();
        let online = views.iter().filter(|v| v.online).count();
        self.metrics.render(views.len(), online)
    }
}
