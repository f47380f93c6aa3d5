//! The embedded broker at its connection limit, over real TCP with real
//! MQTT clients: rumqttd pre-allocates its slabs at `max_connections` and
//! has reports of panicking above it. A client past the limit must be
//! refused while everyone else keeps working, and a freed slot must be
//! usable again.

use std::net::SocketAddr;
use std::time::Duration;

use drover_broker::{Access, Broker, BrokerConfig};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// What one client's event loop saw.
#[derive(Debug)]
enum Seen {
    Connected,
    Message(String, Vec<u8>),
    Error,
}

/// A client whose event loop runs in its own task and reports what it
/// sees; it stops at its first error (no reconnect).
fn client(addr: SocketAddr, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(true);
    let (c, mut ev): (AsyncClient, EventLoop) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    let seen = if a.code == rumqttc::ConnectReturnCode::Success {
                        Seen::Connected
                    } else {
                        Seen::Error
                    };
                    let _ = tx.send(seen);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Seen::Message(p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(Seen::Error);
                    return;
                }
            }
        }
    });
    (c, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>, secs: u64) -> Option<Seen> {
    tokio::time::timeout(Duration::from_secs(secs), rx.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_max_connections_is_refused_and_the_rest_keep_working() {
    let addr = free_addr();
    let mut cfg = BrokerConfig::new(addr);
    cfg.max_connections = 3;
    let broker = Broker::start(cfg, Access::Open).expect("broker starts");
    tokio::spawn(broker.run(std::future::pending()));

    // rumqttd binds inside its accept loop: wait until it accepts.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut clients = Vec::new();
    let mut inboxes = Vec::new();
    for i in 0..3 {
        let (c, mut rx) = client(addr, &format!("c{i}"));
        let seen = next(&mut rx, 10).await;
        assert!(
            matches!(seen, Some(Seen::Connected)),
            "client {i} of 3 connects: {seen:?}"
        );
        clients.push(c);
        inboxes.push(rx);
    }

    let (_over, mut over_rx) = client(addr, "c-over");
    let seen = next(&mut over_rx, 10).await;
    assert!(
        !matches!(seen, Some(Seen::Connected)),
        "a fourth client is not let in at max_connections 3: {seen:?}"
    );

    // The broker still routes for the clients it holds.
    let (sub, mut sub_rx) = client(addr, "c0");
    assert!(
        matches!(next(&mut sub_rx, 10).await, Some(Seen::Connected)),
        "a client id that is already connected takes over its own slot"
    );
    sub.subscribe("limits/t", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    clients[1]
        .publish("limits/t", QoS::AtLeastOnce, false, b"still here".to_vec())
        .await
        .expect("publish");
    match next(&mut sub_rx, 10).await {
        Some(Seen::Message(topic, payload)) => {
            assert_eq!(topic, "limits/t");
            assert_eq!(payload, b"still here");
        }
        other => panic!("the message reaches the subscriber: {other:?}"),
    }

    // A freed slot can be used again.
    clients[2].disconnect().await.expect("disconnect");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_late, mut late_rx) = client(addr, "c-late");
    assert!(
        matches!(next(&mut late_rx, 10).await, Some(Seen::Connected)),
        "a client connects once a slot is free"
    );
}

/// A persistent-session client with its own event loop task; unlike
/// [`client`], it keeps its session (clean_session=false) across
/// reconnects.
fn persistent(addr: SocketAddr, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut ev): (AsyncClient, EventLoop) = AsyncClient::new(opts, 256);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send(Seen::Connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Seen::Message(p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(Seen::Error);
                    return;
                }
            }
        }
    });
    (c, rx)
}

/// rumqttd keeps every filter's messages until its log rolls over. A
/// device's own `cmd` log must keep only a short tail, or every command
/// ever sent to every device stays in memory. Observable from outside: a
/// device that was offline gets only the newest of many queued commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_own_log_keeps_a_short_tail_not_every_command() {
    let addr = free_addr();
    let cfg = BrokerConfig::new(addr);
    let tail_bytes = 2 * cfg.device_log_segment_size;
    let broker = Broker::start(cfg, Access::Open).expect("broker starts");
    tokio::spawn(broker.run(std::future::pending()));
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let topics = drover_shared::topic::Topics::default();
    let device = drover_shared::DeviceId::new("d1").expect("id");
    let cmd = topics.device(&device, drover_shared::topic::TopicKind::Cmd);
    let heartbeats = topics.all_devices(drover_shared::topic::TopicKind::Heartbeat);

    // The device subscribes with a persistent session, then goes away.
    let (dev, mut dev_rx) = persistent(addr, "d1");
    assert!(matches!(next(&mut dev_rx, 10).await, Some(Seen::Connected)));
    dev.subscribe(&cmd, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    dev.disconnect().await.expect("disconnect");
    drop(dev);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A fleet-wide filter for comparison, offline the same way: it keeps
    // the fleet's default, much longer log.
    let (orch, mut orch_rx) = persistent(addr, "orch");
    assert!(matches!(
        next(&mut orch_rx, 10).await,
        Some(Seen::Connected)
    ));
    orch.subscribe(&heartbeats, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    orch.disconnect().await.expect("disconnect");
    drop(orch);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 200 commands of 4 KiB while the device is offline: 800 KiB, far more
    // than its log's tail.
    let count = 200usize;
    let (publisher, mut pub_rx) = client(addr, "publisher");
    assert!(matches!(next(&mut pub_rx, 10).await, Some(Seen::Connected)));
    for i in 0..count {
        let mut payload = vec![b'x'; 4096];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        publisher
            .publish(&cmd, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }
    // The same volume on a fleet-wide topic is all still there.
    let beat = topics.device(&device, drover_shared::topic::TopicKind::Heartbeat);
    for i in 0..count {
        let mut payload = vec![b'h'; 4096];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        publisher
            .publish(&beat, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_orch, mut orch_rx) = persistent(addr, "orch");
    assert!(matches!(
        next(&mut orch_rx, 10).await,
        Some(Seen::Connected)
    ));
    let mut beats = 0;
    while beats < count {
        match next(&mut orch_rx, 10).await {
            Some(Seen::Message(..)) => beats += 1,
            other => panic!("fleet-wide subscriber got {beats}/{count}, then {other:?}"),
        }
    }

    // The device comes back to its session and reads what is left.
    let (_dev, mut dev_rx) = persistent(addr, "d1");
    assert!(matches!(next(&mut dev_rx, 10).await, Some(Seen::Connected)));
    let mut got = Vec::new();
    while let Some(Seen::Message(_, payload)) = next(&mut dev_rx, 3).await {
        got.push(u64::from_be_bytes(
            payload[..8].try_into().expect("8 bytes"),
        ));
    }
    let kept_at_most = tail_bytes / 4096 + 2;
    assert!(
        !got.is_empty() && got.len() <= kept_at_most,
        "the device's log keeps a short tail ({kept_at_most} at most), got {} of {count}",
        got.len()
    );
    assert_eq!(
        got.last().copied(),
        Some(count as u64 - 1),
        "the newest command is in the tail"
    );
}
