//! What an operator sends is checked before it is stored: app specs by
//! field, deploys against what the device already runs (host ports, the
//! size of its whole desired state), and the orchestrator's MQTT link
//! never takes a packet nobody would accept. From the outside probes of
//! the hardening work: a 300 KiB env value, two big apps on one device,
//! references and paths only Docker refused.

use std::time::Duration;

use drover_shared::codec::MAX_PAYLOAD_BYTES;
use drover_shared::model::limits;
use drover_tests::*;
use serde_json::{json, Value};

const OP_TIMEOUT: Duration = Duration::from_secs(90);

fn app(name: &str, container: Value) -> Value {
    let mut c = json!({"name": "main", "image": format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}")});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), container.as_object()) {
        c.extend(extra.clone());
    }
    json!({"name": name, "containers": [c]})
}

/// `n` env values of `bytes` each.
fn env(n: usize, bytes: usize) -> Value {
    let v = "v".repeat(bytes);
    Value::Object((0..n).map(|i| (format!("V{i}"), json!(v))).collect())
}

async fn online(api: &Api, id: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("device {id} online"),
        || async {
            api.device(id)
                .await
                .filter(|d| d["online"] == json!(true))
                .map(|_| ())
        },
    )
    .await;
}

async fn deploy(api: &Api, device: &str, app: &str) -> (u16, Value) {
    api.post(
        &format!("/api/v1/devices/{device}/apps"),
        &json!({ "app": app }),
    )
    .await
}

#[tokio::test]
async fn specs_are_refused_by_field_and_nothing_is_stored() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let nul = "a\u{0}b";
    let cases = [
        // 300 KiB in one env value: once deployed, it wedged the MQTT link.
        (
            json!({"env": {"BIG": "x".repeat(300 * 1024)}}),
            "containers[0].env.BIG",
        ),
        // Every value within its bound, the app over its own.
        (
            json!({"env": env(5, limits::ENV_VALUE_BYTES)}),
            "containers[0]",
        ),
        (json!({"env": {"X": nul}}), "containers[0].env.X"),
        (json!({"command": ["sh", nul]}), "containers[0].command[1]"),
        (
            json!({"volumes": [{"source": "data", "target": "/"}]}),
            "containers[0].volumes[0].target",
        ),
        (
            json!({"volumes": [{"source": "data", "target": "/a/../etc"}]}),
            "containers[0].volumes[0].target",
        ),
        (
            json!({"host_mounts": [{"source": "/srv", "target": "/"}]}),
            "containers[0].host_mounts[0].target",
        ),
        (
            json!({"memory_mb": 1_000_000_000_000u64}),
            "containers[0].memory_mb",
        ),
        (
            json!({"ports": [{"host": 8080, "container": 80}, {"host": 8080, "container": 81}]}),
            "containers[0].ports[1]",
        ),
        (
            json!({"image": "busybox@sha256:abc"}),
            "containers[0].image",
        ),
        (json!({"image": "a/b:c:d"}), "containers[0].image"),
        (json!({"image": "a:b:c"}), "containers[0].image"),
        (json!({"image": "-rm"}), "containers[0].image"),
    ];
    for (container, field) in cases {
        let name = unique("bad");
        let body = app(&name, container);
        let (s, v) = api.post("/api/v1/apps", &body).await;
        let shown = v.to_string();
        let shown = &shown[..shown.len().min(400)];
        assert_eq!(s, 400, "{field}: {shown}");
        assert_eq!(v["error"]["field"], json!(field), "{shown}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "the message names the field: {shown}"
        );
        let (s, _) = api.get(&format!("/api/v1/apps/{name}")).await;
        assert_eq!(s, 404, "{field}: nothing was stored");
        // An update is checked the same way.
        let (s, _) = api.post("/api/v1/apps", &app(&name, json!({}))).await;
        assert_eq!(s, 201);
        let (s, v) = api
            .send_json(reqwest::Method::PUT, &format!("/api/v1/apps/{name}"), &body)
            .await;
        assert_eq!((s, &v["error"]["field"]), (400, &json!(field)), "update");
    }
    // A label is checked too; the app-wide field is `labels.<key>`.
    let mut body = app(&unique("bad"), json!({}));
    body["labels"] = json!({"k": "x".repeat(limits::LABEL_VALUE_BYTES + 1)});
    let (s, v) = api.post("/api/v1/apps", &body).await;
    assert_eq!((s, &v["error"]["field"]), (400, &json!("labels.k")), "{v}");
    orch.stop().await;
}

/// Deploying apps until the device's desired state would not fit in one
/// message: the last deploy is refused (409, naming the device's total),
/// what was accepted runs on real Docker, and the link carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_state_over_one_message_is_refused_and_the_link_carries_on() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let big = Agent::spawn(&orch.broker_url(), &unique("big"));
    let other = Agent::spawn(&orch.broker_url(), &unique("small"));
    online(api, &big.id).await;
    online(api, &other.id).await;

    // Two apps of about 120 KiB each: together close to the limit, and
    // still delivered through the broker to the agent, which runs them.
    let (a, b, c, tiny) = (unique("a"), unique("b"), unique("c"), unique("tiny"));
    let port = free_port();
    for (name, extra) in [
        (&a, json!({"env": env(4, 30 * 1024)})),
        (&b, json!({"env": env(4, 30 * 1024)})),
        (&c, json!({"env": env(1, 20 * 1024)})),
        (&tiny, json!({})),
    ] {
        let (s, v) = api.post("/api/v1/apps", &app(name, extra)).await;
        assert_eq!(s, 201, "{name}: {}", v["error"]);
    }
    for name in [&a, &b] {
        let (s, op) = deploy(api, &big.id, name).await;
        assert_eq!(s, 202, "{op}");
        let done = api.wait_op(&op, OP_TIMEOUT).await;
        assert_eq!(done["status"], json!("succeeded"), "{done}");
    }
    let before = api.device(&big.id).await.expect("device");

    let (s, v) = deploy(api, &big.id, &c).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["field"], json!("app"), "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("device {}", big.id))
            && msg.contains(&MAX_PAYLOAD_BYTES.to_string())
            && msg.contains(a.as_str()),
        "names the device, the limit and what takes the room: {msg}"
    );
    let after = api.device(&big.id).await.expect("device");
    assert_eq!(
        after["desired_generation"], before["desired_generation"],
        "nothing was stored"
    );

    // The link is unaffected: small deploys, to this device and to
    // another, go through at once.
    for device in [&big.id, &other.id] {
        let (s, op) = deploy(api, device, &tiny).await;
        assert_eq!(s, 202, "{op}");
        let done = api.wait_op(&op, OP_TIMEOUT).await;
        assert_eq!(done["status"], json!("succeeded"), "{done}");
    }
    assert_eq!(metric(api, "drover_mqtt_link_connects_total").await, 1);
    assert_eq!(metric(api, "drover_mqtt_publish_oversized_total").await, 0);

    // Within one device a host port belongs to one app: 409 naming both.
    let (p1, p2) = (unique("p1"), unique("p2"));
    for (name, container_port) in [(&p1, 80), (&p2, 8080)] {
        let ports = json!({"ports": [{"host": port, "container": container_port}]});
        let (s, v) = api.post("/api/v1/apps", &app(name, ports)).await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, op) = deploy(api, &other.id, &p1).await;
    assert_eq!(s, 202, "{op}");
    let (s, v) = deploy(api, &other.id, &p2).await;
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("{port}/tcp")) && msg.contains(&format!("app {p1}")),
        "{msg}"
    );
    let done = api.wait_op(&op, OP_TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");

    // A CPU limit above what the device has: Docker would refuse it.
    let cpus = api.device(&other.id).await.expect("device")["inventory"]["cpus"]
        .as_u64()
        .expect("inventory with a CPU count");
    let greedy = unique("greedy");
    let (s, v) = api
        .post("/api/v1/apps", &app(&greedy, json!({"cpus": cpus + 1})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = deploy(api, &other.id, &greedy).await;
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&format!("has {cpus}")), "{msg}");
    orch.stop().await;
}

/// A desired state stored too large before sizes were checked (written
/// straight into the store here): the link drops it, counts it, and keeps
/// serving every other device without reconnecting; the operator can
/// still remove the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_oversized_state_never_enters_the_link() {
    use drover::core::records::{DesiredRecord, DeviceRecord};
    use drover::store::{Store, Write};
    use drover_shared::model::{AppSpec, DesiredApp, DesiredState, RunState};
    use drover_shared::DeviceId;

    let data = tempfile::tempdir().expect("tempdir");
    let legacy = unique("legacy");
    let huge = unique("huge");
    {
        let store = Store::open(&data.path().join("drover.redb")).expect("store");
        let mut spec: AppSpec = serde_json::from_value(app(&huge, json!({}))).expect("spec");
        spec.containers[0]
            .env
            .insert("BIG".into(), "x".repeat(300 * 1024));
        let id = DeviceId::new(legacy.as_str()).expect("id");
        store
            .write(&[
                Write::Device(DeviceRecord {
                    id: id.clone(),
                    first_seen_ms: 1,
                    last_seen_ms: 1,
                    online: false,
                    inventory: None,
                    observed: None,
                    labels: Default::default(),
                }),
                Write::Desired(DesiredRecord {
                    device: id,
                    state: DesiredState {
                        generation: 3,
                        apps: vec![DesiredApp {
                            spec,
                            run: RunState::Running,
                            started_at: 3,
                            release: 0,
                            restarted_at: 0,
                        }],
                        agent: None,
                    },
                    placement: Default::default(),
                }),
            ])
            .expect("write");
    }
    let dir = data.path().to_path_buf();
    let orch = Orch::start_config(move |cfg| cfg.data_dir = dir).await;
    let api = &orch.api;

    let agent = Agent::spawn(&orch.broker_url(), &unique("ok"));
    online(api, &agent.id).await;
    let small = unique("small");
    api.create_app(&small, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let (s, op) = deploy(api, &agent.id, &small).await;
    assert_eq!(s, 202, "{op}");
    let done = api.wait_op(&op, OP_TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    assert_eq!(
        metric(api, "drover_mqtt_link_connects_total").await,
        1,
        "the link never reconnected"
    );
    // It was republished on connect: dropped, counted, not sent.
    assert!(metric(api, "drover_mqtt_publish_oversized_total").await >= 1);

    // The way out: removing the app is accepted and goes out.
    let (s, op) = api
        .delete(&format!("/api/v1/devices/{legacy}/apps/{huge}"))
        .await;
    assert_eq!(s, 202, "{op}");
    wait_for(
        Duration::from_secs(10),
        "the removal to be sent",
        || async {
            let (_, v) = api
                .get(&format!("/api/v1/operations/{}", op["id"].as_str()?))
                .await;
            (v["status"] == json!("sent")).then_some(())
        },
    )
    .await;
    drop(agent);
    orch.stop().await;
    drop(data);
}
