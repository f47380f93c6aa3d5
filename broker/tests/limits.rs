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
