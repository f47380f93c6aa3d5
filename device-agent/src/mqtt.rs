//! The MQTT connection: options, the event loop task, and a publishing handle.
//!
//! The event loop runs in its own task (publishing from the polling task
//! deadlocks rumqttc) and turns broker traffic into [`MqttEvent`]s. rumqttc
//! reconnects immediately when polled after an error, so the loop adds its own
//! exponential backoff with full jitter: a fleet must not reconnect in the
//! same millisecond after a broker restart.

use std::time::Duration;

use drover_shared::codec::{Message, MAX_PAYLOAD_BYTES};
use drover_shared::payload::{Command, Desired, Secret, Secrets, Status};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::enroll::Credential;

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Requests queued in rumqttc while the connection is down. Publishing never
/// waits on a full queue: samples are dropped, state is re-sent on reconnect.
const REQUEST_CAPACITY: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt request queue is full or closed")]
    Queue(#[source] rumqttc::ClientError),
}

/// What the broker connection tells the agent core.
#[derive(Debug)]
pub enum MqttEvent {
    /// A ConnAck: the session is (re)established and must be refreshed.
    Connected,
    Disconnected,
    Desired(Desired),
    Command(Command),
    /// Registry credentials; `Debug` leaves the passwords out.
    Secrets(Secrets),
    /// A chunk of an agent binary this device fetched.
    Blob(drover_shared::update::BlobChunk),
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A cheap, cloneable handle for publishing this device's messages.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Topics,
    device: DeviceId,
    online: watch::Receiver<bool>,
}

impl Publisher {
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    pub fn is_online(&self) -> bool {
        *self.online.borrow()
    }

    /// Queues a message without waiting. State-changing messages are queued
    /// even while offline; rumqttc sends them after reconnecting.
    pub fn send<T: Message>(&self, msg: &T) -> Result<(), MqttError> {
        let kind = T::KIND;
        let topic = self.topics.device(&self.device, kind);
        self.client
            .try_publish(
                topic,
                qos(kind.qos()),
                kind.retained(),
                drover_shared::encode(msg),
            )
            .map_err(MqttError::Queue)
    }

    /// For periodic samples: while offline they would only be stale by the
    /// time they arrive, and they would crowd out acks in the queue.
    pub fn send_sample<T: Message>(&self, msg: &T) -> bool {
        if !self.is_online() {
            return false;
        }
        match self.send(msg) {
            Ok(()) => true,
            Err(e) => {
                debug!(kind = %T::KIND, error = %e, "sample dropped");
                false
            }
        }
    }

    pub(crate) fn subscribe_own(&self) -> Result<(), MqttError> {
        for kind in TopicKind::TO_DEVICE {
            if kind == TopicKind::Enrolled {
                // Only while enrolling, with another session.
                continue;
            }
            self.client
                .try_subscribe(self.topics.device(&self.device, kind), qos(kind.qos()))
                .map_err(MqttError::Queue)?;
        }
        Ok(())
    }

    /// Publishes a clean offline status and disconnects; waits for the
    /// request queue to take both, bounded by `grace`.
    pub(crate) async fn goodbye(&self, at_ms: u64, grace: Duration) {
        let kind = TopicKind::Status;
        let topic = self.topics.device(&self.device, kind);
        let payload = drover_shared::encode(&Status {
            online: false,
            at_ms,
        });
        let send = async {
            self.client
                .publish(topic, qos(kind.qos()), kind.retained(), payload)
                .await?;
            self.client.disconnect().await
        };
        match tokio::time::timeout(grace, send).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not queue offline status"),
            Err(_) => warn!("timed out queueing offline status"),
        }
    }
}

/// Where and how to reach the broker, for both the enrollment exchange and
/// the device's own session.
pub(crate) fn options(config: &AgentConfig, device: &DeviceId) -> MqttOptions {
    let mut opts = MqttOptions::new(
        device.as_str(),
        config.broker_host.clone(),
        config.broker_port,
    );
    opts.set_keep_alive(config.keep_alive);
    opts.set_max_packet_size(MAX_PAYLOAD_BYTES + 4096, MAX_PAYLOAD_BYTES + 4096);
    if let Some(tls) = &config.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    opts
}

/// Builds the client and its event loop. Nothing touches the network yet.
/// Without a credential the agent connects anonymously (a broker without
/// authentication, e.g. a development Mosquitto).
pub fn client(
    config: &AgentConfig,
    device: &DeviceId,
    credential: Option<&Credential>,
) -> (Publisher, EventLoop, watch::Sender<bool>) {
    let mut opts = options(config, device);
    // A persistent session: requests queued during an outage survive it.
    opts.set_clean_session(false);
    if let Some(c) = credential {
        opts.set_credentials(c.device.as_str(), c.password.expose());
    }
    let will = drover_shared::encode(&Status {
        online: false,
        at_ms: 0,
    });
    opts.set_last_will(LastWill::new(
        config.topics.device(device, TopicKind::Status),
        will,
        qos(TopicKind::Status.qos()),
        TopicKind::Status.retained(),
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    // Acks and state reports are small packets that should go out at once,
    // not wait for Nagle's algorithm and the broker's delayed ACK.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (online_tx, online_rx) = watch::channel(false);
    let publisher = Publisher {
        client,
        topics: config.topics.clone(),
        device: device.clone(),
        online: online_rx,
    };
    (publisher, eventloop, online_tx)
}

/// An enrollment token to try once if the broker refuses the stored
/// credential.
pub struct Reenroll {
    pub config: AgentConfig,
    pub token: Secret,
}

/// How long a re-enrollment may hold up the connection loop.
const REENROLL_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls the event loop until the agent has sent DISCONNECT.
pub async fn drive(
    mut eventloop: EventLoop,
    topics: Topics,
    device: DeviceId,
    online: watch::Sender<bool>,
    events: mpsc::Sender<MqttEvent>,
    mut reenroll: Option<Reenroll>,
) {
    let mut backoff = BACKOFF_START;
    let mut malformed: u64 = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(session_present = ack.session_present, "connected to broker");
                backoff = BACKOFF_START;
                online.send_replace(true);
                // A closed channel means the agent is shutting down: keep
                // polling so the goodbye and DISCONNECT still go out.
                let _ = events.send(MqttEvent::Connected).await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let event = match topics.parse(&p.topic) {
                    Some((d, TopicKind::Desired)) if d == device => {
                        drover_shared::decode::<Desired>(&p.payload).map(MqttEvent::Desired)
                    }
                    Some((d, TopicKind::Cmd)) if d == device => {
                        drover_shared::decode::<Command>(&p.payload).map(MqttEvent::Command)
                    }
                    Some((d, TopicKind::Secrets)) if d == device => {
                        drover_shared::decode::<Secrets>(&p.payload).map(MqttEvent::Secrets)
                    }
                    Some((d, TopicKind::Blob)) if d == device => {
                        drover_shared::decode::<drover_shared::update::BlobChunk>(&p.payload)
                            .map(MqttEvent::Blob)
                    }
                    _ => {
                        debug!(topic = ?p.topic, "ignoring message on unexpected topic");
                        continue;
                    }
                };
                match event {
                    Ok(event) => {
                        let _ = events.send(event).await;
                    }
                    Err(e) => {
                        malformed += 1;
                        warn!(topic = ?p.topic, error = ?e.to_string(), malformed_total = malformed, "dropping malformed payload");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                online.send_replace(false);
                debug!("disconnect sent");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let was_online = online.send_replace(false);
                if was_online {
                    let _ = events.try_send(MqttEvent::Disconnected);
                }
                if matches!(
                    e,
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::NotAuthorized
                            | rumqttc::ConnectReturnCode::BadUserNamePassword
                    )
                ) {
                    if let Some(r) = reenroll.take() {
                        warn!("the broker refused this device's credential; enrolling with the token given");
                        let enrolling = crate::enroll::enroll(&r.config, &device, &r.token);
                        match tokio::time::timeout(REENROLL_TIMEOUT, enrolling).await {
                            Ok(Ok(c)) => {
                                eventloop
                                    .mqtt_options
                                    .set_credentials(c.device.as_str(), c.password.expose());
                                backoff = BACKOFF_START;
                                continue;
                            }
                            Ok(Err(e)) => {
                                error!(error = %e, "re-enrollment failed; keeping the stored credential");
                            }
                            Err(_) => {
                                error!("re-enrollment timed out; keeping the stored credential")
                            }
                        }
                    }
                    // Retrying cannot help until someone acts, so wait long.
                    backoff = BACKOFF_MAX;
                    error!("the broker refused this device's credential (revoked, or never enrolled?); the agent keeps the apps running and retries");
                }
                let delay = jitter(backoff);
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Full jitter: anywhere between zero and the current backoff.
fn jitter(backoff: Duration) -> Duration {
    let max = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_backoff() {
        for _ in 0..1000 {
            assert!(jitter(Duration::from_millis(500)) <= Duration::from_millis(500));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
