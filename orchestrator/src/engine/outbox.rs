//! The engine's way out to devices: a bounded queue in front of the MQTT
//! client, drained by its own task. The engine never waits for the broker:
//! it queues and goes on; the outbox task waits for room in rumqttc's
//! request queue, in order. When even the outbox is full, the publish is
//! dropped and counted, and the device heals through its next heartbeat
//! (generations, not messages, are the truth).

use std::sync::Arc;

use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::link::{admit, qos, OversizeLog};
use crate::metrics::Metrics;

/// Publishes waiting for the MQTT client: enough for a desired state and a
/// command to every device of a 10,000-device fleet, several times over.
const OUTBOX: usize = 100_000;

struct Message {
    topic: String,
    /// What it is, for the log: a device topic's kind, or "json".
    what: &'static str,
    qos: QoS,
    retain: bool,
    payload: Vec<u8>,
}

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Message>,
    topics: Topics,
    metrics: Arc<Metrics>,
    oversize: Arc<OversizeLog>,
}

impl Outbox {
    /// Starts the task that hands queued publishes to `client`. It ends
    /// once every `Outbox` is dropped and the queue is empty.
    pub fn spawn(
        client: AsyncClient,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> (Outbox, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Message>(OUTBOX);
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                match client
                    .publish(msg.topic, msg.qos, msg.retain, msg.payload)
                    .await
                {
                    Ok(()) => {
                        m.mqtt_published.inc();
                    }
                    Err(e) => {
                        m.mqtt_publish_failed.inc();
                        warn!(what = msg.what, error = %e, "publish failed; the device gets it on resync");
                    }
                }
            }
        });
        (
            Outbox {
                tx,
                topics,
                metrics,
                oversize: Arc::default(),
            },
            task,
        )
    }

    /// Queues a publish on one of a device's topics; `false` (and counted)
    /// when the queue is full or closed.
    pub fn publish(&self, device: &DeviceId, kind: TopicKind, payload: Vec<u8>) -> bool {
        let topic = self.topics.device(device, kind);
        // A packet no receiver would take never enters the client, which
        // would otherwise send it again on every reconnect.
        if !admit(&topic, qos(kind), &payload, &self.metrics, &self.oversize) {
            return false;
        }
        let msg = Message {
            topic,
            what: kind.as_str(),
            qos: qos(kind),
            retain: kind.retained(),
            payload,
        };
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(e) => {
                self.metrics.mqtt_publish_failed.inc();
                warn!(device = %device, %kind, error = %e, "publish not queued; the device will get it on resync");
                false
            }
        }
    }

    /// Queues a publish on any topic (the JSON automation tree, a rule's
    /// message): same queue, same size check and drop policy as a device's.
    /// The caller chose the topic; `shared::topic` formats Drover's own.
    pub fn publish_raw(&self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool) -> bool {
        if !admit(&topic, qos, &payload, &self.metrics, &self.oversize) {
            return false;
        }
        let msg = Message {
            topic,
            what: "json",
            qos,
            retain,
            payload,
        };
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(e) => {
                self.metrics.mqtt_publish_failed.inc();
                warn!(error = %e, "publish not queued (outbox full or closed)");
                false
            }
        }
    }
}
