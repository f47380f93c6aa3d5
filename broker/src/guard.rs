//! The per-connection authorization wrapper around rumqttd's v4 protocol.
//!
//! rumqttd clones the server's `Protocol` value for every accepted
//! connection and runs every packet read from that client through
//! `read_mut`. [`Guard`] wraps the v4 codec: it learns who the client is from
//! CONNECT (username and client id, matched against the [`Authority`]),
//! refuses a foreign Last Will or PUBLISH by returning a protocol error —
//! which makes rumqttd close the connection — answers a foreign SUBSCRIBE
//! filter with the SUBACK failure code 0x80 (MQTT 3.1.1 §3.9.3; the
//! connection stays up and the filter is never subscribed), and registers
//! the connection so its owner can close it later (a revoked credential).
//!
//! Passwords are checked here too, when rumqttd asks for the login decision
//! right after CONNECT (`Protocol::login`, a marked patch): a refused client
//! gets CONNACK "not authorized". Failed logins are counted, logged at a
//! bounded rate and answered later and later when one address keeps
//! failing (see [`crate::throttle`]); a correct password is never delayed.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use drover_shared::topic::Topics;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    Error as ProtocolError, LoginDecision, Packet, Protocol, SubAck, SubscribeReasonCode,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::acl::{Principal, Refusal};
use crate::throttle::{LogLimit, LoginThrottle};

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
    /// SUBSCRIBE filters answered with the failure code (0x80): outside
    /// the client's permissions.
    pub subscriptions_refused: AtomicU64,
    /// Connections closed for a packet over the size limit
    /// (`BrokerConfig::max_payload_size`).
    pub oversized_packets: AtomicU64,
    /// PUBLISH packets accepted from clients (after the ACL check).
    pub publishes_received: AtomicU64,
    /// PUBLISH packets written to clients.
    pub publishes_sent: AtomicU64,
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

    /// Closes the connection registered as `serial`, if it still is.
    fn kick_serial(&self, client_id: &str, serial: u64) {
        let map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = map.get(client_id).filter(|r| r.serial == serial) {
            r.kick.send_replace(true);
        }
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
    pub(crate) logins: LoginThrottle,
    /// Lines about clients disconnected for a violation: an authenticated
    /// client can reconnect and violate in a loop.
    pub(crate) violation_lines: LogLimit,
    /// Lines about refused subscriptions: the client stays connected and
    /// can ask again and again.
    pub(crate) subscribe_lines: LogLimit,
    /// Lines about oversized packets (any client can send one before
    /// logging in).
    pub(crate) oversized_lines: LogLimit,
    /// Lines about failed TLS handshakes on the MQTTS listener.
    pub(crate) tls_lines: Arc<LogLimit>,
}

impl Shared {
    /// The periodic summaries of what the rate limits kept out of the log.
    pub(crate) fn log_summaries(&self, now: Instant) {
        for s in self.logins.summaries(now) {
            warn!(
                source = %s.source,
                refused = s.count,
                "MQTT logins refused (not logged one by one)"
            );
        }
        if let Some(n) = self.violation_lines.summary(now) {
            warn!(
                count = n,
                "clients disconnected for violations (not logged one by one)"
            );
        }
        if let Some(n) = self.subscribe_lines.summary(now) {
            warn!(count = n, "subscriptions refused (not logged one by one)");
        }
        if let Some(n) = self.tls_lines.summary(now) {
            info!(
                count = n,
                "TLS handshakes failed or timed out (not logged one by one)"
            );
        }
        if let Some(n) = self.oversized_lines.summary(now) {
            warn!(
                count = n,
                "connections closed for oversized packets (not logged one by one)"
            );
        }
    }
}

struct Conn {
    /// The client id as the client sent it (for logs and the authority).
    client_id: String,
    /// The client id rumqttd knows the session by ([`Principal::session_id`]).
    session_id: String,
    username: Option<String>,
    principal: Option<Principal>,
    /// Whether this (enrolling) connection has asked for its credential:
    /// one request per connection, so a connection whose token is used up
    /// cannot keep the orchestrator writing refusals to its audit log.
    enroll_requested: bool,
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
    /// The address of the client (unset on the unconnected template).
    peer: Option<IpAddr>,
    /// The verified client certificate's subject CN (mutual TLS only).
    peer_cn: Option<String>,
    /// Boxed: rumqttd's connection future holds the guard by value in more
    /// than one place, so every byte here counts several times per
    /// connection (measured: 288 bytes inline, ~480 per connection).
    conn: Option<Box<Conn>>,
    /// The CONNECT's password, until the login is decided.
    password: Option<String>,
    /// SUBSCRIBEs that had filters removed, until their SUBACK is written:
    /// the packet id and, per filter in the client's order, whether it was
    /// granted. A lock because rumqttd writes through `&self`; only this
    /// connection's task takes it.
    refused_subscriptions: Mutex<VecDeque<(u16, Vec<bool>)>>,
}

/// SUBSCRIBEs with refused filters waiting for their SUBACK on one
/// connection. The router answers each at once, so only a client that
/// floods SUBSCRIBEs gets near it; it is then disconnected.
const MAX_PENDING_REFUSALS: usize = 64;

impl Guard {
    pub(crate) fn new(shared: Arc<Shared>) -> Guard {
        Guard {
            inner: V4,
            shared,
            peer: None,
            peer_cn: None,
            conn: None,
            password: None,
            refused_subscriptions: Mutex::default(),
        }
    }

    /// A fresh guard for a connection from `peer` whose client certificate
    /// (mutual TLS) has this subject CN. A device or enrolling device must
    /// then connect with that CN as its id: the certificate is bound to the
    /// MQTT identity, so one device's certificate cannot carry another's
    /// login.
    pub(crate) fn for_peer(&self, peer: IpAddr, common_name: Option<String>) -> Guard {
        let mut g = self.clone();
        g.peer = Some(peer);
        g.peer_cn = common_name;
        g
    }

    fn refuse(&self, what: &str, topic: &str) -> ProtocolError {
        self.shared
            .stats
            .acl_violations
            .fetch_add(1, Ordering::Relaxed);
        let client_id = self.conn.as_ref().map_or("", |c| c.client_id.as_str());
        if let Some(suppressed) = self.shared.violation_lines.admit(Instant::now()) {
            // Client ids and topics come from the wire: Debug escapes a
            // newline or a terminal escape that would otherwise forge or
            // hide log lines.
            warn!(
                client_id = ?client_id,
                what,
                topic = ?topic,
                suppressed,
                "not authorized; disconnecting client"
            );
        }
        ProtocolError::InvalidProtocol
    }

    fn check(&mut self, packet: &mut Packet) -> Result<(), ProtocolError> {
        let topics = &self.shared.topics;
        match packet {
            // MQTT 3.1.1 §3.1: a second CONNECT is a protocol violation.
            // It must never get here: rumqttd checks credentials only on
            // the first, so a second one could name another identity.
            Packet::Connect(..) if self.conn.is_some() => Err(self.refuse("second connect", "")),
            Packet::Connect(connect, _, will, _, login) => {
                let username = login.as_ref().map(|l| l.username.as_str());
                self.password = login.as_ref().map(|l| l.password.clone());
                let principal = self
                    .shared
                    .authority
                    .principal(&connect.client_id, username);
                let client_id = connect.client_id.clone();
                // Only a guarded broker has identities to keep apart.
                let session_id = principal
                    .as_ref()
                    .filter(|_| self.shared.require_login)
                    .and_then(|p| p.session_id(&client_id));
                if let Some(session_id) = &session_id {
                    connect.client_id.clone_from(session_id);
                }
                self.conn = Some(Box::new(Conn {
                    session_id: session_id.unwrap_or_else(|| client_id.clone()),
                    client_id,
                    username: username.map(str::to_string),
                    principal,
                    enroll_requested: false,
                    serial: std::sync::OnceLock::new(),
                }));
                if let Some(cn) = &self.peer_cn {
                    let bound = match self.principal() {
                        Some(Principal::Device(id) | Principal::Enrolling(id)) => id.as_str() == cn,
                        _ => true,
                    };
                    if !bound {
                        return Err(self.refuse("client certificate of another identity", cn));
                    }
                }
                // An unknown principal is not refused here: the login
                // decision refuses it next, with a CONNACK.
                if let (Some(will), Some(p)) = (will, self.principal()) {
                    let topic = String::from_utf8_lossy(&will.topic);
                    if !p.may_will(topics, &topic) {
                        return Err(self.refuse("last will", &topic));
                    }
                }
                Ok(())
            }
            // Anything before CONNECT: rumqttd closes the connection
            // (`NotConnectPacket`) and logs it at a bounded rate. Not a
            // violation of anyone's rights (there is no one yet), and
            // never let through.
            _ if self.conn.is_none() => Err(ProtocolError::InvalidProtocol),
            Packet::Publish(publish, _) => {
                let topic = String::from_utf8_lossy(&publish.topic);
                match self.principal() {
                    Some(Principal::Enrolling(_))
                        if self.conn.as_ref().is_some_and(|c| c.enroll_requested) =>
                    {
                        Err(self.refuse("second enrollment request", &topic))
                    }
                    Some(p) if p.may_publish(topics, &topic, publish.retain) => {
                        if let Some(c) = self.conn.as_mut() {
                            c.enroll_requested |=
                                matches!(c.principal, Some(Principal::Enrolling(_)));
                        }
                        Ok(())
                    }
                    _ => Err(self.refuse("publish", &topic)),
                }
            }
            Packet::Subscribe(subscribe, _) => {
                let refusals: Vec<Option<Refusal>> = subscribe
                    .filters
                    .iter()
                    .map(|f| match self.principal() {
                        Some(p) => p.subscribe_refusal(topics, &f.path),
                        None => Some(Refusal::NotGranted),
                    })
                    .collect();
                if refusals.iter().all(Option::is_none) {
                    return Ok(());
                }
                let granted: Vec<bool> = refusals.iter().map(Option::is_none).collect();
                let mut pending = self
                    .refused_subscriptions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if pending.len() >= MAX_PENDING_REFUSALS {
                    drop(pending);
                    return Err(
                        self.refuse("subscribe", "(too many refused subscriptions pending)")
                    );
                }
                let client_id = self.conn.as_ref().map_or("", |c| c.client_id.as_str());
                for (f, why) in subscribe
                    .filters
                    .iter()
                    .zip(&refusals)
                    .filter_map(|(f, r)| r.as_ref().map(|r| (f, r)))
                {
                    self.shared
                        .stats
                        .subscriptions_refused
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.shared.subscribe_lines.admit(Instant::now()) {
                        // Debug: client id and filter come from the wire.
                        warn!(
                            client_id = ?client_id,
                            username = ?self.conn.as_ref().and_then(|c| c.username.as_deref()),
                            filter = ?f.path,
                            reason = %why,
                            suppressed,
                            "subscription not authorized; answered with SUBACK failure code 0x80, the connection stays up"
                        );
                    }
                }
                // The router subscribes the rest (possibly none: it still
                // answers with a SUBACK, which `write` completes).
                let mut keep = granted.iter();
                subscribe
                    .filters
                    .retain(|_| keep.next().is_some_and(|g| *g));
                pending.push_back((subscribe.pkid, granted));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn principal(&self) -> Option<&Principal> {
        self.conn.as_ref().and_then(|c| c.principal.as_ref())
    }

    /// The router's SUBACK for a SUBSCRIBE whose refused filters were taken
    /// out: its codes for the granted filters, 0x80 for the refused ones,
    /// in the order the client sent them.
    fn with_refusals(&self, ack: SubAck) -> SubAck {
        let mut pending = self
            .refused_subscriptions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(at) = pending.iter().position(|(pkid, _)| *pkid == ack.pkid) else {
            return ack;
        };
        let Some((_, granted)) = pending.remove(at) else {
            return ack;
        };
        let mut router_codes = ack.return_codes.into_iter();
        let return_codes = granted
            .into_iter()
            .map(|g| {
                let router_code = if g { router_codes.next() } else { None };
                router_code.unwrap_or(SubscribeReasonCode::Failure)
            })
            .collect();
        SubAck {
            pkid: ack.pkid,
            return_codes,
        }
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
                self.shared.connections.unregister(&c.session_id, *serial);
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
        let mut packet = match self.inner.read_mut(stream, max_size) {
            Ok(p) => p,
            Err(ProtocolError::PayloadSizeLimitExceeded(size)) => {
                // rumqttd closes the connection on this error but neither
                // counts nor (at the orchestrator's log level) logs it: a
                // device whose messages outgrew the limit would just keep
                // reconnecting, unexplained.
                self.shared
                    .stats
                    .oversized_packets
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.shared.oversized_lines.admit(Instant::now()) {
                    let client_id = self.conn.as_ref().map_or("", |c| c.client_id.as_str());
                    warn!(
                        client_id = ?client_id,
                        peer = ?self.peer,
                        size,
                        limit = max_size,
                        suppressed,
                        "packet over the size limit; disconnecting client"
                    );
                }
                return Err(ProtocolError::PayloadSizeLimitExceeded(size));
            }
            Err(e) => return Err(e),
        };
        self.check(&mut packet)?;
        if matches!(packet, Packet::Publish(..)) {
            self.shared
                .stats
                .publishes_received
                .fetch_add(1, Ordering::Relaxed);
        }
        unpin(&mut packet);
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, ProtocolError> {
        let packet = match packet {
            Packet::SubAck(ack, props) => Packet::SubAck(self.with_refusals(ack), props),
            Packet::Publish(..) => {
                self.shared
                    .stats
                    .publishes_sent
                    .fetch_add(1, Ordering::Relaxed);
                packet
            }
            other => other,
        };
        self.inner.write(packet, write)
    }

    fn login(&mut self) -> Option<LoginDecision> {
        // An open broker lets everyone in (rumqttd has no credentials set).
        if !self.shared.require_login {
            return None;
        }
        let password = self.password.take();
        let (client_id, username) = match &self.conn {
            Some(c) => (c.client_id.as_str(), c.username.as_deref()),
            None => ("", None),
        };
        let ok = match (username, &password) {
            (Some(u), Some(p)) => self.shared.authority.authenticate(client_id, u, p),
            _ => false,
        };
        if ok {
            return Some(Box::pin(std::future::ready(true)));
        }
        self.shared
            .stats
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        let failure = self.shared.logins.failed(self.peer, Instant::now());
        if let Some(earlier) = failure.line {
            // Debug: client id and username come from the wire.
            warn!(
                source = %failure.source,
                client_id = ?client_id,
                username = ?username.unwrap_or_default(),
                without_credentials = username.is_none(),
                earlier_not_logged = earlier,
                "MQTT login refused"
            );
        }
        // Only the refusal waits: the correct password above never does,
        // so a device behind an address that keeps failing still gets in.
        let delay = failure.delay;
        Some(Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            false
        }))
    }

    fn kick_signal(&self) -> Option<watch::Receiver<bool>> {
        let c = self.conn.as_ref()?;
        let (serial, kick) = self
            .shared
            .connections
            .register(&c.session_id, c.username.as_deref());
        let _ = c.serial.set(serial);
        // A revocation between the authentication hook and this
        // registration found nothing to close; it is visible now, so ask
        // again and close at once if the identity is gone or changed.
        let now = self
            .shared
            .authority
            .principal(&c.client_id, c.username.as_deref());
        if now != c.principal {
            warn!(
                client_id = ?c.client_id,
                "identity revoked or changed while connecting; disconnecting client"
            );
            self.shared.connections.kick_serial(&c.session_id, serial);
        }
        Some(kick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::DeviceId;
    use rumqttd::protocol::{Connect, Login};
    use rumqttd::protocol::{LastWill, QoS};

    /// Devices `a` and `b` and the automation identity `auto`, whatever
    /// the password; `revoked` makes `a` unknown from then on.
    #[derive(Default)]
    struct Fake {
        revoked: std::sync::atomic::AtomicBool,
    }

    impl Authority for Fake {
        fn authenticate(&self, _: &str, _: &str, _: &str) -> bool {
            true
        }
        fn principal(&self, client_id: &str, username: Option<&str>) -> Option<Principal> {
            match username? {
                "$orchestrator" => Some(Principal::Owner),
                "$enroll" => DeviceId::new(client_id).ok().map(Principal::Enrolling),
                "$auto:auto" => Some(Principal::Automation {
                    name: "auto".into(),
                    subscribe: vec!["#".into()],
                    publish: vec![],
                }),
                "a" if self.revoked.load(Ordering::Relaxed) => None,
                u if u == client_id => DeviceId::new(u).ok().map(Principal::Device),
                _ => None,
            }
        }
    }

    fn guard(authority: Arc<Fake>) -> (Guard, Arc<Shared>) {
        let shared = Arc::new(Shared {
            require_login: true,
            authority,
            topics: Topics::default(),
            stats: Arc::new(GuardStats::default()),
            connections: Arc::new(Connections::default()),
            logins: LoginThrottle::new(Default::default()),
            violation_lines: LogLimit::new(std::time::Duration::from_secs(60), 20),
            subscribe_lines: LogLimit::new(std::time::Duration::from_secs(60), 20),
            oversized_lines: LogLimit::new(std::time::Duration::from_secs(60), 20),
            tls_lines: Arc::new(LogLimit::new(std::time::Duration::from_secs(60), 20)),
        });
        (Guard::new(shared.clone()), shared)
    }

    fn connect(client_id: &str, username: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        let packet = Packet::Connect(
            Connect {
                keep_alive: 10,
                client_id: client_id.into(),
                clean_session: false,
            },
            None,
            None,
            None,
            Some(Login {
                username: username.into(),
                password: "pw".into(),
            }),
        );
        V4.write(packet, &mut buf).expect("encode connect");
        buf
    }

    fn read(g: &mut Guard, mut bytes: BytesMut) -> Result<Packet, ProtocolError> {
        g.read_mut(&mut bytes, 1 << 20)
    }

    #[test]
    fn a_second_connect_cannot_change_who_the_client_is() {
        let (mut g, shared) = guard(Arc::default());
        assert!(read(&mut g, connect("a", "a")).is_ok());
        // Credentials are checked on the first CONNECT only, so a second
        // one naming the orchestrator would otherwise make `a` the owner.
        assert!(read(&mut g, connect("a", "$orchestrator")).is_err());
        assert_eq!(shared.stats.acl_violations.load(Ordering::Relaxed), 1);
        assert_eq!(
            g.principal(),
            Some(&Principal::Device(DeviceId::new("a").expect("id")))
        );
    }

    fn publish(topic: &str) -> BytesMut {
        let mut buf = BytesMut::new();
        // `Publish::new` is QoS 0, which needs no packet id.
        let p = rumqttd::protocol::Publish::new(topic.to_string(), "x".to_string(), false);
        V4.write(Packet::Publish(p, None), &mut buf)
            .expect("encode publish");
        buf
    }

    #[test]
    fn an_enrolling_client_asks_once_per_connection() {
        let (mut g, _) = guard(Arc::default());
        assert!(read(&mut g, connect("new-1", "$enroll")).is_ok());
        assert!(read(&mut g, publish("drover/v1/dev/new-1/enroll")).is_ok());
        assert!(read(&mut g, publish("drover/v1/dev/new-1/enroll")).is_err());
    }

    #[test]
    fn clients_that_choose_their_client_id_get_their_own_sessions() {
        let (mut g, _) = guard(Arc::default());
        let Ok(Packet::Connect(c, ..)) = read(&mut g, connect("b", "$auto:auto")) else {
            panic!("connect refused");
        };
        assert_ne!(
            c.client_id, "b",
            "an automation client took device b's session"
        );
        let (mut g, _) = guard(Arc::default());
        let Ok(Packet::Connect(c, ..)) = read(&mut g, connect("b", "b")) else {
            panic!("connect refused");
        };
        assert_eq!(c.client_id, "b", "a device keeps its id as its session");
    }

    #[test]
    fn a_revocation_while_connecting_closes_the_connection() {
        let fake = Arc::new(Fake::default());
        let (mut g, _) = guard(fake.clone());
        assert!(read(&mut g, connect("a", "a")).is_ok());
        // Revoked after the authentication hook said yes, before the link
        // registered for the kick signal: nothing was there to close.
        fake.revoked.store(true, Ordering::Relaxed);
        let kick = g.kick_signal().expect("kick signal");
        assert!(*kick.borrow(), "a revoked device stays connected");

        let (mut g, _) = guard(Arc::default());
        assert!(read(&mut g, connect("b", "b")).is_ok());
        assert!(!*g.kick_signal().expect("kick signal").borrow());
    }

    fn open_guard() -> Guard {
        Guard::new(Arc::new(Shared {
            require_login: false,
            authority: Arc::new(crate::OpenAuthority),
            topics: Topics::default(),
            stats: Arc::default(),
            connections: Arc::default(),
            logins: LoginThrottle::new(Default::default()),
            violation_lines: LogLimit::new(std::time::Duration::from_secs(60), 20),
            subscribe_lines: LogLimit::new(std::time::Duration::from_secs(60), 20),
            oversized_lines: LogLimit::new(std::time::Duration::from_secs(60), 20),
            tls_lines: Arc::new(LogLimit::new(std::time::Duration::from_secs(60), 20)),
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
#[cfg(test)]
mod size {
    /// rumqttd's per-connection future holds the guard by value in several
    /// places: at 10,000 connections each 100 bytes here is several MiB.
    #[test]
    fn a_guard_is_small() {
        let size = std::mem::size_of::<super::Guard>();
        assert!(size <= 160, "Guard is {size} bytes");
    }
}
