//! The JSON mirror: a subscriber of the engine's change stream that
//! publishes the fleet as JSON under `<root>/v1/json/` (see
//! docs/protocol.md, "The JSON tree"), and, when asked for, Home
//! Assistant's discovery configs.
//!
//! Telemetry, status, events, operation outcomes and rollouts carry what
//! they show and are published at once. Inventory and state changes carry
//! only the device id: they mark the device, and every 250 ms one engine
//! read fetches the marked devices' views (a chatty device costs one read
//! per tick, not one per report). At start, after falling behind the
//! stream (`Lagged`), and when Home Assistant comes online, a snapshot of
//! every retained topic is published again: the embedded broker keeps
//! retained messages in memory only.
//!
//! Telemetry is most of the mirror's traffic (one document per device per
//! sample). With the embedded broker it does not go through the link's
//! MQTT client: it is gathered and handed to the router in one batch per
//! tick, through an in-process link (`drover_broker::LocalPublisher`), at
//! QoS 0 as before. Per message that saves the MQTT encoding, a socket
//! write and read, the decoding and the guard's check, and a router
//! wake-up; telemetry documents arrive at most one tick (250 ms) later.
//! Everything else keeps the link (QoS 1, in order with the rest).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use drover_shared::topic::{JsonKind, Topics};
use drover_shared::DeviceId;
use rumqttc::QoS;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::homeassistant::Discovery;
use super::json;
use crate::contract::{self, Change};
use crate::engine::{EngineHandle, Outbox};
use crate::link::Inbound;
use crate::metrics::Metrics;
use drover_broker::{LocalMessage, LocalPublisher};

const FLUSH: Duration = Duration::from_millis(250);

pub struct Mirror {
    pub topics: Topics,
    pub outbox: Outbox,
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub homeassistant: Option<Discovery>,
    /// Devices whose inventory or state changed since the last flush.
    dirty: BTreeSet<DeviceId>,
    /// The embedded broker's in-process link, and telemetry waiting for
    /// the next tick on it.
    fast: Option<LocalPublisher>,
    batch: Vec<LocalMessage>,
}

impl Mirror {
    pub fn new(
        topics: Topics,
        outbox: Outbox,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
        homeassistant: Option<Discovery>,
        fast: Option<LocalPublisher>,
    ) -> Mirror {
        Mirror {
            topics,
            outbox,
            engine,
            metrics,
            homeassistant,
            dirty: BTreeSet::new(),
            fast,
            batch: Vec::new(),
        }
    }

    /// Runs until `stopping` flips. `inbox` carries Home Assistant's
    /// birth messages when discovery is on.
    pub async fn run(
        mut self,
        mut changes: broadcast::Receiver<Arc<Change>>,
        mut inbox: Option<broadcast::Receiver<Arc<Inbound>>>,
        mut stopping: watch::Receiver<bool>,
    ) {
        self.snapshot().await;
        let mut tick = tokio::time::interval(FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ha_status = self.homeassistant.as_ref().map(Discovery::status_topic);
        loop {
            tokio::select! {
                _ = super::stopped(&mut stopping) => break,
                c = changes.recv() => match c {
                    Ok(c) => self.on_change(&c),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "the JSON mirror fell behind the change stream; publishing a snapshot");
                        self.snapshot().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick(), if !self.dirty.is_empty() || !self.batch.is_empty() => {
                    self.send_batch();
                    self.flush().await;
                }
                m = recv(&mut inbox) => {
                    if let Some(m) = m {
                        if Some(&m.topic) == ha_status.as_ref() && m.payload.as_ref() == b"online" {
                            info!("Home Assistant came online; announcing every device again");
                            if let Some(ha) = self.homeassistant.as_mut() {
                                ha.forget();
                            }
                            self.snapshot().await;
                        }
                    }
                }
            }
        }
    }

    fn publish<T: Serialize>(&self, topic: String, doc: &T, qos: QoS, retain: bool) {
        let mut body = Vec::with_capacity(512);
        if serde_json::to_writer(&mut body, doc).is_err() {
            return;
        }
        self.send(topic, body, qos, retain);
    }

    fn send(&self, topic: String, body: Vec<u8>, qos: QoS, retain: bool) {
        if !self.outbox.publish_raw(topic, body, qos, retain) {
            self.metrics.json_mirror_dropped.inc();
        }
    }

    /// Hands the gathered telemetry to the router in one go.
    fn send_batch(&mut self) {
        let (Some(fast), false) = (self.fast.as_mut(), self.batch.is_empty()) else {
            return;
        };
        let batch = std::mem::take(&mut self.batch);
        let n = batch.len() as u64;
        if !fast.publish_batch(batch) {
            self.metrics.json_mirror_dropped.inc_by(n);
        }
    }

    fn device_doc<T: Serialize>(&mut self, device: &DeviceId, kind: JsonKind, doc: &T) {
        if kind == JsonKind::Telemetry && self.fast.is_some() {
            let mut payload = Vec::with_capacity(512);
            if serde_json::to_writer(&mut payload, doc).is_ok() {
                self.batch.push(LocalMessage {
                    topic: self.topics.json_device(device, kind),
                    payload,
                    retain: kind.retained(),
                });
            }
            return;
        }
        let qos = if kind == JsonKind::Telemetry {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.publish(
            self.topics.json_device(device, kind),
            doc,
            qos,
            kind.retained(),
        );
    }

    fn on_change(&mut self, change: &Change) {
        match change {
            Change::Telemetry { device, telemetry } => self.device_doc(
                device,
                JsonKind::Telemetry,
                &json::TelemetryDoc::new(device, telemetry),
            ),
            Change::Device {
                device,
                online,
                at_ms,
            } => self.device_doc(
                device,
                JsonKind::Status,
                &json::Status::new(device, *online, *at_ms),
            ),
            Change::Inventory { device, .. } | Change::State { device, .. } => {
                self.dirty.insert(device.clone());
            }
            Change::Event { device, event } => {
                self.device_doc(device, JsonKind::Event, &json::Event { device, event })
            }
            Change::Operation { operation } if operation.status.is_final() => self.publish(
                self.topics.json_operations(),
                operation,
                QoS::AtLeastOnce,
                false,
            ),
            Change::Rollout { rollout } => self.rollout(rollout),
            Change::Lagged { .. } => {}
            // Rule firings are published by the rules task itself
            // (`json/fleet/rules`).
            Change::Operation { .. }
            | Change::Logs { .. }
            | Change::App { .. }
            | Change::Job { .. }
            | Change::RuleFiring { .. } => {}
        }
    }

    fn rollout(&self, rollout: &contract::Rollout) {
        self.publish(
            self.topics.json_rollout(&rollout.id),
            rollout,
            QoS::AtLeastOnce,
            true,
        );
    }

    /// Inventory, state and discovery of one device from its view.
    fn device_view(&mut self, v: &contract::Device) {
        if let Some(h) = &v.inventory {
            self.device_doc(
                &v.id,
                JsonKind::Inventory,
                &json::Inventory::new(&v.id, h, &v.labels),
            );
        }
        self.device_doc(&v.id, JsonKind::State, &json::State::of(v));
        if let Some(ha) = self.homeassistant.as_mut() {
            for (topic, body) in ha.update(v) {
                if !self.outbox.publish_raw(topic, body, QoS::AtLeastOnce, true) {
                    self.metrics.json_mirror_dropped.inc();
                }
            }
        }
    }

    async fn flush(&mut self) {
        let ids = std::mem::take(&mut self.dirty);
        let views = self
            .engine
            .read(move |f, _| {
                ids.iter()
                    .filter_map(|id| f.device_view(id))
                    .collect::<Vec<_>>()
            })
            .await;
        match views {
            Ok(views) => views.iter().for_each(|v| self.device_view(v)),
            Err(e) => warn!(error = %e, "JSON mirror: reading devices failed"),
        }
    }

    /// Every retained JSON topic again, from the engine's state.
    async fn snapshot(&mut self) {
        self.dirty.clear();
        let devices = match self.engine.devices().await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "JSON mirror: snapshot failed");
                return;
            }
        };
        for v in &devices {
            self.device_doc(
                &v.id,
                JsonKind::Status,
                &json::Status::new(&v.id, v.online, v.last_seen_ms),
            );
            if let Some(t) = &v.telemetry {
                self.device_doc(
                    &v.id,
                    JsonKind::Telemetry,
                    &json::TelemetryDoc::new(&v.id, t),
                );
            }
            self.device_view(v);
        }
        if let Some(ha) = self.homeassistant.as_mut() {
            let present: HashSet<DeviceId> = devices.iter().map(|v| v.id.clone()).collect();
            for (topic, body) in ha.remove_missing(&present) {
                self.send(topic, body, QoS::AtLeastOnce, true);
            }
        }
        match self.engine.rollouts(None).await {
            Ok(rollouts) => rollouts.iter().for_each(|r| self.rollout(r)),
            Err(e) => warn!(error = %e, "JSON mirror: reading rollouts failed"),
        }
    }
}

/// The next inbox message, or never when there is no inbox.
async fn recv(inbox: &mut Option<broadcast::Receiver<Arc<Inbound>>>) -> Option<Arc<Inbound>> {
    match inbox {
        Some(rx) => match rx.recv().await {
            Ok(m) => Some(m),
            Err(broadcast::error::RecvError::Lagged(_)) => None,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
