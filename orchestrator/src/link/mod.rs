//! The orchestrator's MQTT link: a plain MQTT client, so the same code works
//! against the embedded broker and any external one. It turns incoming
//! publishes into [`Event`]s and hands them to the service loop.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_shared::codec::{decode, DecodeError, MAX_PACKET_BYTES, MAX_PAYLOAD_BYTES};
use drover_shared::payload::EnrollRequest;
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::update::FetchRequest;
use drover_shared::DeviceId;
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::core::fleet::DeviceMessage;
use crate::metrics::Metrics;

/// Everything the service loop reacts to. Closed on purpose: a new kind of
/// input is a new variant and a compile error wherever it is not handled.
#[derive(Debug)]
pub enum Event {
    /// (Re)connected to the broker; subscriptions are in place.
    Connected,
    Device {
        id: DeviceId,
        msg: Box<DeviceMessage>,
        /// Handed over from the broker's retained store on subscribing,
        /// not sent just now: no proof the device is there.
        retained: bool,
    },
    /// A device without a credential presents an enrollment token.
    Enroll {
        id: DeviceId,
        request: EnrollRequest,
    },
    /// A device's progress or outcome of an edge job.
    Job {
        id: DeviceId,
        report: drover_shared::job::JobReport,
    },
    /// A device asks for a chunk of an agent binary.
    Fetch { id: DeviceId, request: FetchRequest },
}

/// A publish on a topic outside the device tree, which the link receives
/// because something asked for it through [`Subscriptions`] (automation
/// requests, rules' MQTT triggers).
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub retain: bool,
}

/// Where the link hands [`Inbound`] messages: a bounded broadcast channel,
/// so a slow reader loses messages (and learns how many), never slows the
/// link. Readers call `subscribe()`.
pub type Inbox = broadcast::Sender<Arc<Inbound>>;

/// Inbound messages kept for a slow reader before it lags.
pub const INBOX: usize = 4096;

/// Topic filters outside the device tree the link subscribes to, on top of
/// the device topics: kept here so every (re)connect subscribes them again.
/// Cheap to clone; all clones share one set.
#[derive(Clone)]
pub struct Subscriptions {
    filters: Arc<Mutex<BTreeSet<String>>>,
    client: AsyncClient,
}

impl Subscriptions {
    pub fn new(client: AsyncClient) -> Subscriptions {
        Subscriptions {
            filters: Arc::default(),
            client,
        }
    }

    /// Adds `filter` (QoS 1); subscribes now unless it was there already.
    /// While disconnected, rumqttc queues the request; the next ConnAck
    /// subscribes every filter again anyway.
    pub async fn add(&self, filter: &str) {
        let new = self
            .filters
            .lock()
            .expect("subscriptions lock")
            .insert(filter.to_string());
        if new {
            if let Err(e) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
                warn!(%filter, error = %e, "subscribe failed; retried on reconnect");
            }
        }
    }

    /// Removes `filter` and unsubscribes, if it was there.
    pub async fn remove(&self, filter: &str) {
        let had = self
            .filters
            .lock()
            .expect("subscriptions lock")
            .remove(filter);
        if had {
            if let Err(e) = self.client.unsubscribe(filter).await {
                warn!(%filter, error = %e, "unsubscribe failed");
            }
        }
    }

    pub fn filters(&self) -> Vec<String> {
        self.filters
            .lock()
            .expect("subscriptions lock")
            .iter()
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub topics: Topics,
    /// Username and password, when the broker wants them.
    pub credentials: Option<(String, String)>,
    /// MQTT over TLS with this client config (an external mqtts:// broker).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

pub fn qos(kind: TopicKind) -> QoS {
    if kind.qos() == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Decodes a publish on a device topic. `Ok(None)` for topics the
/// orchestrator itself publishes (it may see its own retained messages).
pub fn decode_device_message(
    kind: TopicKind,
    payload: &[u8],
) -> Result<Option<DeviceMessage>, DecodeError> {
    Ok(Some(match kind {
        TopicKind::Hello => DeviceMessage::Hello(decode(payload)?),
        TopicKind::Status => DeviceMessage::Status(decode(payload)?),
        TopicKind::Heartbeat => DeviceMessage::Heartbeat(decode(payload)?),
        TopicKind::State => DeviceMessage::State(decode(payload)?),
        TopicKind::Telemetry => DeviceMessage::Telemetry(decode(payload)?),
        TopicKind::Logs => DeviceMessage::Logs(decode(payload)?),
        TopicKind::Ack => DeviceMessage::Ack(decode(payload)?),
        TopicKind::Event => DeviceMessage::Event(decode(payload)?),
        // Enrollment, jobs and agent binaries are not fleet matters: see
        // `drive`.
        TopicKind::Enroll | TopicKind::Job | TopicKind::Fetch => return Ok(None),
        TopicKind::Cmd
        | TopicKind::Desired
        | TopicKind::Enrolled
        | TopicKind::Secrets
        | TopicKind::Blob => return Ok(None),
    }))
}

pub fn connect(cfg: &LinkConfig) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    // A persistent session with a stable id: requests queued during an
    // outage survive the reconnect (rumqttc drops them with a clean session).
    opts.set_clean_session(false);
    // Outgoing: what the broker and the agents accept (`admit` keeps
    // larger packets from ever reaching the client).
    opts.set_max_packet_size(MAX_PAYLOAD_BYTES + 8 * 1024, MAX_PACKET_BYTES);
    opts.set_inflight(100);
    if let Some((user, pass)) = &cfg.credentials {
        opts.set_credentials(user.clone(), pass.clone());
    }
    if let Some(tls) = &cfg.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 16_384);
    eventloop.set_network_options(nodelay());
    (client, eventloop)
}

/// The size of a PUBLISH packet as rumqttc writes it: fixed header,
/// remaining length, topic, packet id (QoS 1 and 2), payload.
pub fn publish_packet_size(topic: &str, qos: QoS, payload_len: usize) -> usize {
    let pkid = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let len = 2 + topic.len() + pkid + payload_len;
    let len_len = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + len
}

/// Topics an oversized publish was dropped on, so each is logged once,
/// not on every republish. Bounded: forgotten wholesale when full.
#[derive(Debug, Default)]
pub struct OversizeLog {
    seen: Mutex<HashSet<String>>,
}

impl OversizeLog {
    const MAX_TOPICS: usize = 4096;

    /// Whether this is the first drop on `topic` (since the last reset).
    fn first(&self, topic: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(topic) {
            return false;
        }
        if seen.len() >= Self::MAX_TOPICS {
            seen.clear();
        }
        seen.insert(topic.to_string())
    }
}

/// Whether a publish may be handed to the MQTT client. A packet no
/// receiver takes can never be delivered, and once inside rumqttc it is
/// worse than lost: the event loop fails on it, reconnects, and with the
/// persistent session tries the same packet again, forever, holding up
/// every other device's messages. So it is dropped here, counted, and
/// logged once per topic. Deploys never get this far with one (the fleet
/// refuses them); this is the last line, e.g. for a state stored before.
pub fn admit(topic: &str, qos: QoS, payload: &[u8], metrics: &Metrics, log: &OversizeLog) -> bool {
    let size = publish_packet_size(topic, qos, payload.len());
    if payload.len() <= MAX_PAYLOAD_BYTES && size <= MAX_PACKET_BYTES {
        return true;
    }
    metrics.mqtt_publish_oversized.inc();
    if log.first(topic) {
        warn!(
            %topic,
            payload_bytes = payload.len(),
            packet_bytes = size,
            max_payload_bytes = MAX_PAYLOAD_BYTES,
            max_packet_bytes = MAX_PACKET_BYTES,
            "publish dropped: no agent or broker accepts a packet this large"
        );
    } else {
        debug!(%topic, packet_bytes = size, "oversized publish dropped again");
    }
    false
}

/// Commands and acks are small packets that should go out at once, not wait
/// for Nagle's algorithm and the peer's delayed ACK (about 40 ms each way).
fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Drives the event loop until our client disconnects (shutdown), or the
/// engine is gone. Polling again right after
/// an error makes rumqttc reconnect at once, so errors sleep with jittered
/// exponential backoff first.
pub async fn drive(
    client: AsyncClient,
    mut eventloop: EventLoop,
    cfg: LinkConfig,
    events: mpsc::Sender<Event>,
    extra: Subscriptions,
    inbox: Inbox,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut rejects = LogLimit::new(REJECT_LINES_PER_MINUTE);
    loop {
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                metrics.mqtt_link_connects.inc();
                info!(broker = %format!("{}:{}", cfg.host, cfg.port), session_present = ack.session_present, "connected to broker");
                for kind in TopicKind::FROM_DEVICE {
                    if let Err(e) = client
                        .subscribe(cfg.topics.all_devices(kind), QoS::AtLeastOnce)
                        .await
                    {
                        warn!(error = %e, "subscribe failed");
                    }
                }
                for filter in extra.filters() {
                    if let Err(e) = client.subscribe(&filter, QoS::AtLeastOnce).await {
                        warn!(%filter, error = %e, "subscribe failed");
                    }
                }
                if events.send(Event::Connected).await.is_err() {
                    return;
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                metrics.mqtt_received.inc();
                let Some((id, kind)) = cfg.topics.parse(&p.topic) else {
                    if inbox.receiver_count() > 0 {
                        // Asked for through `Subscriptions`; readers judge it.
                        let _ = inbox.send(Arc::new(Inbound {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                        }));
                    } else {
                        metrics.mqtt_rejected.inc();
                        debug!(topic = ?p.topic, "ignoring publish on a foreign topic");
                    }
                    continue;
                };
                if kind == TopicKind::Enroll {
                    match decode::<EnrollRequest>(&p.payload) {
                        Ok(request) => {
                            if events.send(Event::Enroll { id, request }).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            metrics.mqtt_rejected.inc();
                            if let Some(suppressed) = rejects.allow(std::time::Instant::now()) {
                                warn!(device = %id, error = ?e.to_string(), suppressed, "rejected enrollment request");
                            }
                        }
                    }
                    continue;
                }
                if kind == TopicKind::Job {
                    match decode::<drover_shared::job::JobReport>(&p.payload) {
                        Ok(report) => {
                            if events.send(Event::Job { id, report }).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            metrics.mqtt_rejected.inc();
                            if let Some(suppressed) = rejects.allow(std::time::Instant::now()) {
                                warn!(device = %id, error = ?e.to_string(), suppressed, "rejected job report");
                            }
                        }
                    }
                    continue;
                }
                if kind == TopicKind::Fetch {
                    match decode::<FetchRequest>(&p.payload) {
                        // Never waits: a device asking faster than chunks
                        // are served loses requests (and asks again), it
                        // does not hold up other devices' messages.
                        Ok(request) => match events.try_send(Event::Fetch { id, request }) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                metrics.mqtt_rejected.inc();
                                debug!("fetch dropped: the engine's queue is full");
                            }
                        },
                        Err(e) => {
                            metrics.mqtt_rejected.inc();
                            if let Some(suppressed) = rejects.allow(std::time::Instant::now()) {
                                warn!(device = %id, error = ?e.to_string(), suppressed, "rejected fetch request");
                            }
                        }
                    }
                    continue;
                }
                match decode_device_message(kind, &p.payload) {
                    Ok(Some(msg)) => {
                        if events
                            .send(Event::Device {
                                id,
                                msg: Box::new(msg),
                                retained: p.retain,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        metrics.mqtt_rejected.inc();
                        // Device-controlled text, escaped (`?`), and at most
                        // a few lines a minute: a device sending garbage
                        // fills a counter, not the log.
                        if let Some(suppressed) = rejects.allow(std::time::Instant::now()) {
                            warn!(device = %id, topic = ?p.topic, error = ?e.to_string(), suppressed, "rejected device message");
                        }
                    }
                }
            }
            // Our own goodbye (shutdown): the link ends here. Polling on
            // would reconnect and republish every desired state.
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                info!("disconnected from broker");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_sizes_are_what_rumqttc_writes() {
        for topic in ["d", "drover/v1/dev/pi/cmd", &"t".repeat(300)] {
            for len in [
                0,
                1,
                100,
                127,
                128,
                16_000,
                16_384,
                MAX_PAYLOAD_BYTES,
                3 << 20,
            ] {
                for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
                    let mut p = rumqttc::Publish::new(topic, qos, vec![0u8; len]);
                    p.pkid = u16::from(qos != QoS::AtMostOnce);
                    assert_eq!(
                        publish_packet_size(topic, qos, len),
                        p.size(),
                        "{topic} {len} {qos:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn oversized_publishes_are_dropped_counted_and_logged_once() {
        let metrics = Metrics::default();
        let log = OversizeLog::default();
        let topic = "drover/v1/dev/pi/desired";
        let q = QoS::AtLeastOnce;
        assert!(admit(topic, q, &vec![0; MAX_PAYLOAD_BYTES], &metrics, &log));
        assert!(!admit(
            topic,
            q,
            &vec![0; MAX_PAYLOAD_BYTES + 1],
            &metrics,
            &log
        ));
        // A payload within its limit on a topic so long the packet is not.
        let long = "t".repeat(5000);
        assert!(!admit(
            &long,
            q,
            &vec![0; MAX_PAYLOAD_BYTES],
            &metrics,
            &log
        ));
        assert_eq!(metrics.mqtt_publish_oversized.get(), 2);
        assert!(!log.first(topic), "the first drop was logged already");
        assert!(log.first("drover/v1/dev/other/desired"));
    }
}

/// Log lines about rejected device messages, per minute.
const REJECT_LINES_PER_MINUTE: u32 = 20;

/// At most `per_minute` lines a minute; the first line after a quiet spell
/// says how many were left out.
struct LogLimit {
    per_minute: u32,
    window: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    fn new(per_minute: u32) -> LogLimit {
        LogLimit {
            per_minute,
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(lines left out since the last one)` when a line may be
    /// written now.
    fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
        {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.per_minute {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod log_limit_tests {
    use super::*;

    #[test]
    fn lines_are_capped_per_minute_and_the_gap_is_counted() {
        let t0 = std::time::Instant::now();
        let mut l = LogLimit::new(3);
        assert_eq!(
            (0..5).map(|_| l.allow(t0)).collect::<Vec<_>>(),
            [Some(0), Some(0), Some(0), None, None]
        );
        assert_eq!(l.allow(t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_secs(62)), Some(0));
    }
}
