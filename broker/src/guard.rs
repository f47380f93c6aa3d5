//! The per-connection authorization wrapper around rumqttd's v4 protocol.
//!
//! rumqttd clones the server's `Protocol` value for every accepted
//! connection and runs every packet read from that client through
//! `read_mut`. [`Guard`] wraps the v4 codec: it learns who the client is from
//! CONNECT (username and client id, matched against the [`Authority`]),
//! refuses a foreign Last Will, PUBLISH or SUBSCRIBE by returning a protocol
//! error — which makes rumqttd close the connection — and registers the
//! connection so its owner can close it later (a revoked credential).
//!
//! Password checking is not done here but in rumqttd's authentication hook
//! (see [`crate::Broker::start`]), which runs right after this wrapper has
//! read CONNECT; a client the hook refuses gets CONNACK "not authorized".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use drover_shared::topic::Topics;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Error as ProtocolError, Packet, Protocol};
use tokio::sync::watch;
use tracing::warn;

use crate::acl::Principal;

/// The broker's source of identities: the orchestrator's device registry.
pub trait Authority: Send + Sync + 'static {
    /// Whether these credentials may connect with this client id. Called by
    /// rumqttd's authentication hook for every CONNECT.
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool;

    /// Who a client with this username and client id is, or `None` for
    /// nobody. Must agree with [`Authority::authenticate`].
    fn principal(&self, client_id: &str, username: Option<&str>) -> Option<Principal>;
}

/// Counters the orchestrator exports as metrics.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Connections closed for publishing or subscribing out of bounds.
    pub acl_violations: AtomicU64,
    /// CONNECTs whose credentials the authority refused.
    pub auth_failures: AtomicU64,
}

struct Registered {
    serial: u64,
    username: Option<String>,
    kick: watch::Sender<bool>,
}

/// Open, identified connections, by client id.
#[derive(Default)]
pub struct Connections {
    by_client: Mutex<HashMap<String, Registered>>,
    next_serial: AtomicU64,
}

impl Connections {
    /// Closes the connection with this client id, if there is one. Returns
    /// whether one was found.
    pub fn kick_client(&self, client_id: &str) -> bool {
        let map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(client_id) {
            Some(r) => {
                r.kick.send_replace(true);
                true
            }
            None => false,
        }
    }

    /// Closes every connection that logged in with this username.
    pub fn kick_user(&self, username: &str) -> usize {
        let map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for r in map.values() {
            if r.username.as_deref() == Some(username) {
                r.kick.send_replace(true);
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.by_client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn register(&self, client_id: &str, username: Option<&str>) -> (u64, watch::Receiver<bool>) {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (kick, rx) = watch::channel(false);
        let mut map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        // A second connection with the same client id takes over the
        // session (rumqttd closes the first); the newest owns the entry.
        map.insert(
            client_id.to_string(),
            Registered {
                serial,
                username: username.map(str::to_string),
                kick,
            },
        );
        (serial, rx)
    }

    fn unregister(&self, client_id: &str, serial: u64) {
        let mut map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(client_id).is_some_and(|r| r.serial == serial) {
            map.remove(client_id);
        }
    }
}

pub(crate) struct Shared {
    /// Whether CONNECT must carry credentials (rumqttd refuses one without
    /// before asking the hook, so it is counted here).
    pub(crate) require_login: bool,
    pub(crate) authority: Arc<dyn Authority>,
    pub(crate) topics: Topics,
    pub(crate) stats: Arc<GuardStats>,
    pub(crate) connections: Arc<Connections>,
}

struct Conn {
    client_id: String,
    username: Option<String>,
    principal: Option<Principal>,
    /// Set once the connection is registered, which happens only after
    /// authentication succeeded (rumqttd asks for the kick signal when it
    /// starts the link): a refused CONNECT with a live client's id must not
    /// take that client's place in the registry.
    serial: std::sync::OnceLock<u64>,
}

/// See the module documentation. Cloning gives a fresh, unconnected guard.
pub struct Guard {
    inner: V4,
    shared: Arc<Shared>,
    /// The verified client certificate's subject CN (mutual TLS only).
    peer_cn: Option<String>,
    conn: Option<Conn>,
}

impl Guard {
    pub(crate) fn new(shared: Arc<Shared>) -> Guard {
        Guard {
            inner: V4,
            shared,
            peer_cn: None,
            conn: None,
        }
    }

    /// A fresh guard for a connection whose client certificate (mutual
    /// TLS) has this subject CN. A device or enrolling device must then
    /// connect with that CN as its id: the certificate is bound to the MQTT
    /// identity, so one device's certificate cannot carry another's login.
    pub(crate) fn for_peer(&self, common_name: Option<String>) -> Guard {
        let mut g = self.clone();
        g.peer_cn = common_name;
        g
    }

    fn refuse(&self, what: &str, topic: &str) -> ProtocolError {
        self.shared
            .stats
            .acl_violations
            .fetch_add(1, Ordering::Relaxed);
        let client_id = self.conn.as_ref().map_or("", |c| c.client_id.as_str());
        warn!(
            client_id,
            what, topic, "not authorized; disconnecting client"
        );
        ProtocolError::InvalidProtocol
    }

    fn check(&mut self, packet: &Packet) -> Result<(), ProtocolError> {
        let topics = &self.shared.topics;
        match packet {
            Packet::Connect(connect, _, will, _, login) => {
                let username = login.as_ref().map(|l| l.username.as_str());
                if login.is_none() && self.shared.require_login {
                    self.shared
                        .stats
                        .auth_failures
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(client_id = %connect.client_id, "MQTT CONNECT without credentials refused");
                }
                let principal = self
                    .shared
                    .authority
                    .principal(&connect.client_id, username);
                self.conn = Some(Conn {
                    client_id: connect.client_id.clone(),
                    username: username.map(str::to_string),
                    principal,
                    serial: std::sync::OnceLock::new(),
                });
                if let Some(cn) = &self.peer_cn {
                    let bound = match self.principal() {
                        Some(Principal::Device(id) | Principal::Enrolling(id)) => id.as_str() == cn,
                        _ => true,
                    };
                    if !bound {
                        return Err(self.refuse("client certificate of another identity", cn));
                    }
                }
                // An unknown principal is not refused here: the
                // authentication hook refuses it next, with a CONNACK.
                if let (Some(will), Some(p)) = (will, self.principal()) {
                    let topic = String::from_utf8_lossy(&will.topic);
                    if !p.may_will(topics, &topic) {
                        return Err(self.refuse("last will", &topic));
                    }
                }
                Ok(())
            }
            Packet::Publish(publish, _) => {
                let topic = String::from_utf8_lossy(&publish.topic);
                match self.principal() {
                    Some(p) if p.may_publish(topics, &topic) => Ok(()),
                    _ => Err(self.refuse("publish", &topic)),
                }
            }
            Packet::Subscribe(subscribe, _) => {
                for f in &subscribe.filters {
                    match self.principal() {
                        Some(p) if p.may_subscribe(topics, &f.path) => {}
                        _ => return Err(self.refuse("subscribe", &f.path)),
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn principal(&self) -> Option<&Principal> {
        self.conn.as_ref().and_then(|c| c.principal.as_ref())
    }
}

impl Clone for Guard {
    fn clone(&self) -> Guard {
        Guard::new(self.shared.clone())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            if let Some(serial) = c.serial.get() {
                self.shared.connections.unregister(&c.client_id, *serial);
            }
        }
    }
}

/// Gives a packet's byte fields their own allocations.
///
/// rumqttd's v4 codec parses a packet as slices of the connection's read
/// buffer. A slice that the router keeps — a publish in a filter's commit
/// log or in the retained map, a Last Will — keeps that whole buffer
/// (10 KiB or more) alive, and the connection allocates a fresh one. The
/// load test measured it: at 10,000 devices the orchestrator's RSS grew
/// ~20 MB/min under heartbeats and telemetry alone, heaptrack attributing
/// the live growth to `BytesMut::reserve` in rumqttd's network reads
/// (loadtest/RESULTS.md). A copy of the topic and payload (tens to
/// hundreds of bytes) makes what the router keeps cost what it holds.
fn unpin(packet: &mut Packet) {
    fn own(b: &mut bytes::Bytes) {
        *b = bytes::Bytes::copy_from_slice(b);
    }
    match packet {
        Packet::Publish(publish, _) => {
            own(&mut publish.topic);
            own(&mut publish.payload);
        }
        Packet::Connect(_, _, Some(will), _, _) => {
            own(&mut will.topic);
            own(&mut will.message);
        }
        _ => {}
    }
}

impl Protocol for Guard {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, ProtocolError> {
        let mut packet = self.inner.read_mut(stream, max_size)?;
        self.check(&packet)?;
        unpin(&mut packet);
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, ProtocolError> {
        self.inner.write(packet, write)
    }

    fn kick_signal(&self) -> Option<watch::Receiver<bool>> {
        let c = self.conn.as_ref()?;
        let (serial, kick) = self
            .shared
            .connections
            .register(&c.client_id, c.username.as_deref());
        let _ = c.serial.set(serial);
        Some(kick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{Connect, LastWill, QoS};

    fn open_guard() -> Guard {
        Guard::new(Arc::new(Shared {
            require_login: false,
            authority: Arc::new(crate::OpenAuthority),
            topics: Topics::default(),
            stats: Arc::default(),
            connections: Arc::default(),
        }))
    }

    /// Whether `b` points into the allocation `buf` was read into.
    fn inside(b: &[u8], start: usize, len: usize) -> bool {
        let p = b.as_ptr() as usize;
        p >= start && p < start + len
    }

    #[test]
    fn what_the_router_keeps_does_not_pin_the_read_buffer() {
        let will = LastWill {
            topic: "drover/v1/dev/d1/status".into(),
            message: vec![0xa0; 40].into(),
            qos: QoS::AtLeastOnce,
            retain: true,
        };
        let connect = Packet::Connect(
            Connect {
                keep_alive: 10,
                client_id: "d1".into(),
                clean_session: false,
            },
            None,
            Some(will),
            None,
            None,
        );
        let publish = Packet::Publish(
            rumqttd::protocol::Publish::new("drover/v1/dev/d1/heartbeat", "beat", false),
            None,
        );
        let mut stream = BytesMut::with_capacity(4096);
        V4.write(connect, &mut stream).expect("connect encodes");
        V4.write(publish, &mut stream).expect("publish encodes");
        let (start, len) = (stream.as_ptr() as usize, stream.capacity());

        let mut guard = open_guard();
        match guard.read_mut(&mut stream, 1 << 20).expect("connect reads") {
            Packet::Connect(_, _, Some(will), _, _) => {
                assert_eq!(&will.topic[..], b"drover/v1/dev/d1/status");
                assert_eq!(will.message.len(), 40);
                assert!(
                    !inside(&will.topic, start, len),
                    "will topic pins the buffer"
                );
                assert!(
                    !inside(&will.message, start, len),
                    "will message pins the buffer"
                );
            }
            other => panic!("expected CONNECT with a will, got {other:?}"),
        }
        match guard.read_mut(&mut stream, 1 << 20).expect("publish reads") {
            Packet::Publish(p, _) => {
                assert_eq!(&p.topic[..], b"drover/v1/dev/d1/heartbeat");
                assert_eq!(&p.payload[..], b"beat");
                assert!(!inside(&p.topic, start, len), "topic pins the buffer");
                assert!(!inside(&p.payload, start, len), "payload pins the buffer");
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}
