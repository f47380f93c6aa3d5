//! The MQTT side as an outsider sees it: Drover on an external broker
//! (Mosquitto), and garbage from a client that is not ours.

use std::time::Duration;

use drover::server::BrokerMode;
use drover_shared::codec::{encode_with_version, MAX_PAYLOAD_BYTES};
use drover_shared::model::DesiredState;
use drover_shared::payload::{Desired, Heartbeat, Status};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{encode, DeviceId};
use drover_tests::*;
use serde_json::json;

const OP_TIMEOUT: Duration = Duration::from_secs(90);

async fn online(api: &Api, id: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("device {id} online"),
        || async {
            api.device(id)
                .await
                .filter(|d| d["online"] == json!(true) && d["inventory"].is_object())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_mosquitto_as_external_broker() {
    let docker = docker().await;
    let mosq = Mosquitto::start().await;
    let orch = Orch::start_with(BrokerMode::External {
        host: "127.0.0.1".into(),
        port: mosq.port,
    })
    .await;
    let agent = Agent::spawn(&format!("mqtt://127.0.0.1:{}", mosq.port), &unique("mosq"));
    online(&orch.api, &agent.id).await;

    let image = fresh_image(&unique("mosq")).await;
    let app = unique("mapp");
    orch.api.create_app(&app, &image).await;
    let (s, op) = orch
        .api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        orch.api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    let c = docker
        .inspect_container(
            &agent.container_name(&app, "main"),
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("container exists");
    assert_eq!(c.state.and_then(|s| s.running), Some(true));

    // The Last Will works on Mosquitto too.
    let mut agent = agent;
    agent.kill().await;
    wait_for(
        Duration::from_secs(10),
        "offline via Mosquitto's Last Will",
        || async {
            orch.api
                .device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(false))
        },
    )
    .await;
    untag(&image);
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_topic_is_counted_and_changes_nothing() {
    let docker = docker().await;
    // Any client may publish anywhere here: this test is about payloads (the
    // access rules have their own tests in security.rs).
    let orch = Orch::start_open().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("junk"));
    online(&orch.api, &agent.id).await;
    let image = fresh_image(&unique("junk")).await;
    let app = unique("japp");
    orch.api.create_app(&app, &image).await;
    let (_, op) = orch
        .api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(
        orch.api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    let before = orch.api.device(&agent.id).await.expect("device");
    let rejected_before = metric(&orch.api, "drover_mqtt_rejected_total").await;

    let topics = Topics::default();
    let dev = DeviceId::new(agent.id.clone()).expect("id");
    let oversized = vec![0xa1u8; MAX_PAYLOAD_BYTES + 10];
    let hb = encode(&Heartbeat {
        at_ms: 1,
        seq: 1,
        uptime_s: 1,
        applied_generation: 99,
        interval_ms: 5_000,
    });
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\xff\x00 definitely not cbor".to_vec()),
        ("json", br#"{"online": false}"#.to_vec()),
        ("empty", Vec::new()),
        ("truncated", hb[..hb.len() - 2].to_vec()),
        ("oversized", oversized),
        (
            "wrong version",
            encode_with_version(
                7,
                &Status {
                    online: false,
                    at_ms: 1,
                },
            ),
        ),
        // A valid payload of another type: a heartbeat is neither a status, nor a command.
        ("wrong type", hb.clone()),
    ];
    let mut sent_to_orch = 0;
    for kind in TopicKind::ALL {
        for (what, p) in &payloads {
            // A heartbeat on the heartbeat topic is valid; everything else is not.
            if kind == TopicKind::Heartbeat && *what == "wrong type" {
                continue;
            }
            mosquitto_pub(orch.mqtt_port, &topics.device(&dev, kind), p, false).await;
            if TopicKind::FROM_DEVICE.contains(&kind) {
                sent_to_orch += 1;
            }
        }
    }
    // Garbage on a topic outside the tree, and a device id that is not valid.
    mosquitto_pub(
        orch.mqtt_port,
        "drover/v1/dev/not valid!/status",
        b"x",
        false,
    )
    .await;

    let rejected = wait_for(
        Duration::from_secs(10),
        "every bad device payload counted",
        || async {
            let n = metric(&orch.api, "drover_mqtt_rejected_total").await;
            (n >= rejected_before + sent_to_orch).then_some(n)
        },
    )
    .await;
    eprintln!("rejected {} bad payloads", rejected - rejected_before);

    // Nothing changed: still online, same generations, container still runs.
    let after = orch.api.device(&agent.id).await.expect("device");
    assert_eq!(after["online"], json!(true), "{after}");
    assert_eq!(after["desired_generation"], before["desired_generation"]);
    assert_eq!(after["applied_generation"], before["applied_generation"]);
    let c = docker
        .inspect_container(
            &agent.container_name(&app, "main"),
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("container still exists");
    assert_eq!(c.state.and_then(|s| s.running), Some(true));

    // And the agent survived its share and still obeys: stop works.
    let (_, op) = orch
        .api
        .post(
            &format!("/api/v1/devices/{}/apps/{app}/stop", agent.id),
            &json!(null),
        )
        .await;
    assert_eq!(
        orch.api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    untag(&image);
    orch.stop().await;
}

/// Retained garbage on the `desired` topic is the first thing a restarting
/// agent reads. It must neither crash the agent nor replace the desired
/// state the agent keeps locally (a payload that decoded as "generation 999,
/// no apps" would remove everything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_garbage_on_desired_then_agent_restart_keeps_state() {
    let docker = docker().await;
    // Any client may publish anywhere here: this test is about payloads (the
    // access rules have their own tests in security.rs).
    let orch = Orch::start_open().await;
    let mut agent = Agent::spawn(&orch.broker_url(), &unique("rjunk"));
    online(&orch.api, &agent.id).await;
    let image = fresh_image(&unique("rjunk")).await;
    let app = unique("rapp");
    orch.api.create_app(&app, &image).await;
    let (_, op) = orch
        .api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(
        orch.api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    let name = agent.container_name(&app, "main");
    let id_before = docker
        .inspect_container(
            &name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("container exists")
        .id;

    let topic = Topics::default().device(
        &DeviceId::new(agent.id.clone()).expect("id"),
        TopicKind::Desired,
    );
    let wipe = Desired {
        state: DesiredState {
            generation: 999,
            apps: Vec::new(),
            agent: None,
        },
    };
    let valid_wipe = encode(&wipe);
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\xff\x00 definitely not cbor".to_vec()),
        ("truncated", valid_wipe[..valid_wipe.len() - 3].to_vec()),
        ("wrong version", encode_with_version(2, &wipe)),
        (
            "wrong type",
            encode(&Status {
                online: true,
                at_ms: 1,
            }),
        ),
    ];
    for (i, (what, payload)) in payloads.iter().enumerate() {
        agent.kill().await;
        mosquitto_pub(orch.mqtt_port, &topic, payload, true).await;
        agent.start(&orch.broker_url());
        online(&orch.api, &agent.id).await;
        // The retained payload arrives on subscribe, before this command: once
        // it is done, the agent has read (and survived) the garbage.
        let verb = if i % 2 == 0 { "stop" } else { "start" };
        let (s, op) = orch
            .api
            .post(
                &format!("/api/v1/devices/{}/apps/{app}/{verb}", agent.id),
                &json!(null),
            )
            .await;
        assert_eq!(s, 202, "{op}");
        assert_eq!(
            orch.api.wait_op(&op, OP_TIMEOUT).await["status"],
            json!("succeeded"),
            "{verb} after retained {what}"
        );
        let d = orch.api.device(&agent.id).await.expect("device");
        assert_eq!(
            d["observed"]["desired_generation"],
            json!(i + 2),
            "retained {what} must not be adopted: {d}"
        );
    }
    wait_converged(&orch.api, &docker, &agent.id, OP_TIMEOUT).await;
    let id_after = docker
        .inspect_container(
            &name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("container still exists")
        .id;
    assert_eq!(
        id_after, id_before,
        "the container was never removed or recreated"
    );
    untag(&image);
    orch.stop().await;
}
