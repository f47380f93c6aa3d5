//! Whether a device is online, and what the orchestrator does on its way
//! out: probes from outside with real MQTT clients (Mosquitto's and
//! rumqttc) against the embedded broker and a real Mosquitto.

use std::time::Duration;

use drover::server::BrokerMode;
use drover_shared::encode;
use drover_shared::payload::{Heartbeat, Hello, Status};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;
use drover_tests::*;
use serde_json::json;

fn topic(device: &str, kind: TopicKind) -> String {
    Topics::default().device(&DeviceId::new(device).expect("id"), kind)
}

fn heartbeat(interval_ms: u64) -> Vec<u8> {
    encode(&Heartbeat {
        at_ms: 1,
        seq: 1,
        uptime_s: 1,
        applied_generation: 0,
        interval_ms,
    })
}

async fn online(api: &Api, id: &str) -> Option<bool> {
    api.device(id).await.and_then(|d| d["online"].as_bool())
}

/// One heartbeat from a device's credentials used to keep it online for
/// good. Now it counts for a few of its intervals, then the device is
/// offline, without any Last Will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_heartbeat_does_not_keep_a_device_online() {
    let orch = Orch::start_config(|cfg| {
        cfg.mqtt_auth = false;
        cfg.device_timeout = Duration::from_secs(2);
    })
    .await;
    let id = unique("ghost");
    mosquitto_pub(
        orch.mqtt_port,
        &topic(&id, TopicKind::Hello),
        &encode(&Hello::default()),
        false,
    )
    .await;
    mosquitto_pub(
        orch.mqtt_port,
        &topic(&id, TopicKind::Heartbeat),
        &heartbeat(400),
        false,
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "online after a heartbeat",
        || async { online(&orch.api, &id).await.filter(|o| *o).map(|_| ()) },
    )
    .await;
    let start = std::time::Instant::now();
    wait_for(
        Duration::from_secs(10),
        "offline once heartbeats stop",
        || async { online(&orch.api, &id).await.filter(|o| !*o).map(|_| ()) },
    )
    .await;
    // Three missed 400 ms heartbeats, give or take the expiry tick.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    // A device whose heartbeats name no interval gets the default (2 s).
    let old = unique("old-agent");
    mosquitto_pub(
        orch.mqtt_port,
        &topic(&old, TopicKind::Hello),
        &encode(&Hello::default()),
        false,
    )
    .await;
    mosquitto_pub(
        orch.mqtt_port,
        &topic(&old, TopicKind::Heartbeat),
        &heartbeat(0),
        false,
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the default timeout applies",
        || async { online(&orch.api, &old).await.filter(|o| !*o).map(|_| ()) },
    )
    .await;
    orch.stop().await;
}

/// With a broker that keeps retained messages (Mosquitto), a device's
/// retained heartbeat is handed to the orchestrator when it subscribes,
/// after the Last Will or not. It used to bring a dead device back online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_heartbeat_after_the_last_will_is_no_proof_of_life() {
    let mosq = Mosquitto::start().await;
    let data = tempfile::tempdir().expect("tempdir");
    let path = data.path().to_path_buf();
    let external = BrokerMode::External {
        host: "127.0.0.1".into(),
        port: mosq.port,
    };
    let orch = Orch::start_config({
        let (path, external) = (path.clone(), external.clone());
        move |cfg| {
            cfg.data_dir = path;
            cfg.broker = external;
        }
    })
    .await;
    let id = unique("dead");
    mosquitto_pub(
        mosq.port,
        &topic(&id, TopicKind::Hello),
        &encode(&Hello::default()),
        true,
    )
    .await;
    mosquitto_pub(
        mosq.port,
        &topic(&id, TopicKind::Heartbeat),
        &heartbeat(60_000),
        true,
    )
    .await;
    wait_for(Duration::from_secs(10), "online", || async {
        online(&orch.api, &id).await.filter(|o| *o).map(|_| ())
    })
    .await;
    // The device dies: its Last Will (retained) says offline.
    mosquitto_pub(
        mosq.port,
        &topic(&id, TopicKind::Status),
        &encode(&Status {
            online: false,
            at_ms: 0,
        }),
        true,
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "offline by the Last Will",
        || async { online(&orch.api, &id).await.filter(|o| !*o).map(|_| ()) },
    )
    .await;
    orch.stop().await;

    // A new orchestrator on the same data subscribes and is handed the
    // retained hello, heartbeat and Last Will, in whatever order.
    let orch = Orch::start_config(move |cfg| {
        cfg.data_dir = path;
        cfg.broker = external;
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            online(&orch.api, &id).await,
            Some(false),
            "a retained message made a dead device online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    orch.stop().await;
}

/// After the orchestrator says DISCONNECT on its way out, its link used to
/// reconnect and publish every desired state again before the process
/// ended. A watcher on the broker sees nothing from it after the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_reconnect_and_republish() {
    let mosq = Mosquitto::start().await;
    let orch = Orch::start_with(BrokerMode::External {
        host: "127.0.0.1".into(),
        port: mosq.port,
    })
    .await;
    let id = unique("quiet");
    mosquitto_pub(
        mosq.port,
        &topic(&id, TopicKind::Hello),
        &encode(&Hello::default()),
        false,
    )
    .await;
    wait_for(Duration::from_secs(10), "device known", || async {
        orch.api.device(&id).await.map(|_| ())
    })
    .await;
    let app = unique("app");
    orch.api
        .create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let (s, op) = orch
        .api
        .post(&format!("/api/v1/devices/{id}/apps"), &json!({"app": app}))
        .await;
    assert_eq!(s, 202, "{op}");

    // A watcher of every desired-state topic: it gets the retained one now.
    let mut opts = rumqttc::MqttOptions::new(unique("watch"), "127.0.0.1", mosq.port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    client
        .subscribe(
            Topics::default().all_devices(TopicKind::Desired),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .expect("subscribe");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                let _ = tx.send(p.topic);
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the retained desired state")
        .expect("watcher");
    assert_eq!(first, topic(&id, TopicKind::Desired));
    while tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_ok()
    {}

    let stopped = std::time::Instant::now();
    orch.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopped.elapsed()
    );
    let late = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
    assert!(
        late.is_err(),
        "the orchestrator published {late:?} after it was told to stop"
    );
}
