//! The JSON automation surface over MQTT, with outside clients: Debian's
//! mosquitto_sub and paho-mqtt (PyPI, in the test venv) as automation
//! identities, a real agent and real Docker. Containers are checked through
//! the Docker API, never through Drover.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use drover::automation::{AutomationConfig, HomeAssistantConfig};
use drover_tests::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const TIMEOUT: Duration = Duration::from_secs(90);
const VENV_PYTHON: &str = "/opt/drover-test-venv/bin/python";

/// Creates an automation identity; returns its password.
async fn mqtt_user(api: &Api, body: Value) -> String {
    let (s, v) = api.post("/api/v1/mqtt-users", &body).await;
    assert_eq!(s, 201, "{v}");
    v["password"].as_str().expect("password").to_string()
}

/// Runs mosquitto_sub as `$auto:name`; returns (topic, payload) of what
/// arrived (at most `count`, within `secs`) and stderr.
async fn sub(
    orch: &Orch,
    name: &str,
    pw: &str,
    filters: &[&str],
    count: usize,
    secs: u64,
) -> (Vec<(String, String)>, String) {
    let mut cmd = tokio::process::Command::new("mosquitto_sub");
    cmd.args(["-h", &orch.mqtt_host, "-p", &orch.mqtt_port.to_string()])
        .args(["-u", &format!("$auto:{name}"), "-P", pw, "-v"])
        .args(["-C", &count.to_string(), "-W", &secs.to_string()]);
    for f in filters {
        cmd.args(["-t", f]);
    }
    let out = cmd
        .output()
        .await
        .expect("mosquitto_sub runs (mosquitto-clients)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let msgs = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
    (msgs, String::from_utf8_lossy(&out.stderr).to_string())
}

async fn sub_json(orch: &Orch, name: &str, pw: &str, topic: &str) -> Value {
    let (msgs, err) = sub(orch, name, pw, &[topic], 1, 20).await;
    let (_, p) = msgs
        .first()
        .unwrap_or_else(|| panic!("nothing on {topic}: {err}"));
    serde_json::from_str(p).unwrap_or_else(|e| panic!("{topic}: not JSON ({e}): {p}"))
}

/// Sends `requests` (one per line, as is) with the paho-mqtt client as
/// `$auto:name`; returns the answers that arrived.
async fn requests(orch: &Orch, name: &str, pw: &str, requests: &[String]) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mqtt_requests.py");
    let mut child = tokio::process::Command::new(VENV_PYTHON)
        .args([
            script,
            &orch.mqtt_host,
            &orch.mqtt_port.to_string(),
            name,
            pw,
            "drover",
            "30",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the test venv's python with paho-mqtt (scripts/test-env.sh)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(requests.join("\n").as_bytes())
        .await
        .expect("write requests");
    drop(stdin);
    let out = child.wait_with_output().await.expect("python ends");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("answer not JSON ({e}): {l}")))
        .collect()
}

async fn online_agent(orch: &Orch, prefix: &str) -> Agent {
    let agent = Agent::spawn(&orch.broker_url(), &unique(prefix));
    wait_for(Duration::from_secs(30), "device online", || async {
        orch.api
            .device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    agent
}

async fn container_running(docker: &bollard::Docker, device: &str, app: &str) -> bool {
    device_containers(docker, device)
        .await
        .iter()
        .any(|c| c.app == app && c.running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automation_identities_read_json_and_command_through_the_command_path() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let agent = online_agent(&orch, "auto").await;
    let dev = agent.id.clone();
    let app = unique("web");
    api.create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let op_pw = mqtt_user(api, json!({"name": "nr", "role": "operator"})).await;
    let view_pw = mqtt_user(api, json!({"name": "watcher"})).await;
    let spy_pw = mqtt_user(api, json!({"name": "spy", "subscribe": ["#"]})).await;
    let (_, users) = api.get("/api/v1/mqtt-users").await;
    let roles: Vec<(String, String)> = users
        .as_array()
        .expect("list")
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap_or_default().into(),
                u["role"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert!(roles.contains(&("nr".into(), "operator".into())), "{users}");
    assert!(
        roles.contains(&("watcher".into(), "viewer".into())),
        "{users}"
    );

    // JSON telemetry and the retained status, read by mosquitto_sub.
    let t = sub_json(
        &orch,
        "nr",
        &op_pw,
        &format!("drover/v1/json/dev/{dev}/telemetry"),
    )
    .await;
    assert_eq!(t["device"], json!(dev), "{t}");
    for f in ["cpu_percent", "memory_percent", "disk_percent", "at_ms"] {
        assert!(t[f].is_number(), "{f} in {t}");
    }
    let m = t["memory_percent"].as_f64().expect("number");
    assert!((0.0..=100.0).contains(&m), "{t}");
    let s = sub_json(
        &orch,
        "watcher",
        &view_pw,
        &format!("drover/v1/json/dev/{dev}/status"),
    )
    .await;
    assert_eq!(
        (s["online"].clone(), s["status"].clone()),
        (json!(true), json!("online")),
        "{s}"
    );
    assert!(s["last_seen_ms"].as_u64().is_some_and(|t| t > 0), "{s}");
    let inv = sub_json(
        &orch,
        "nr",
        &op_pw,
        &format!("drover/v1/json/dev/{dev}/inventory"),
    )
    .await;
    assert!(
        inv["hostname"].is_string() && inv["cpus"].as_u64().is_some_and(|c| c > 0),
        "{inv}"
    );

    // A subscription reaching confidential device topics is answered with
    // a SUBACK failure, not a disconnect: the granted filter beside it
    // keeps delivering on the same connection.
    let (msgs, err) = sub(
        &orch,
        "nr",
        &op_pw,
        &[
            "drover/v1/dev/+/#",
            &format!("drover/v1/json/dev/{dev}/status"),
        ],
        1,
        20,
    )
    .await;
    assert_eq!(msgs.len(), 1, "the granted filter delivers: {err}");

    // Another identity cannot read nr's answers: the subscription is
    // refused, and nothing arrives while nr works.
    let spy = tokio::spawn({
        let (host, port) = (orch.mqtt_host.clone(), orch.mqtt_port);
        async move {
            tokio::process::Command::new("mosquitto_sub")
                .args([
                    "-h",
                    &host,
                    "-p",
                    &port.to_string(),
                    "-u",
                    "$auto:spy",
                    "-P",
                    &spy_pw,
                ])
                .args([
                    "-t",
                    "drover/v1/json/res/nr",
                    "-t",
                    "drover/v1/json/res/+",
                    "-v",
                    "-W",
                    "20",
                ])
                .output()
                .await
                .expect("mosquitto_sub")
        }
    });

    // A viewer's deploy is refused with a JSON error and changes nothing.
    let before = operations(api, &dev).await.len();
    let answers = requests(
        &orch,
        "watcher",
        &view_pw,
        &[json!({"id": "v-1", "cmd": "deploy", "device": dev, "app": app}).to_string()],
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    let a = &answers[0];
    assert_eq!(
        (a["id"].clone(), a["ok"].clone(), a["status"].clone()),
        (json!("v-1"), json!(false), json!(403)),
        "{a}"
    );
    assert_eq!(a["error"]["code"], json!("forbidden"), "{a}");
    assert_eq!(
        operations(api, &dev).await.len(),
        before,
        "a refused deploy made no operation"
    );
    assert!(!container_running(&docker, &dev, &app).await);

    // The operator deploys by a JSON request; the answer is correlated and
    // the container runs.
    let answers = requests(
        &orch,
        "nr",
        &op_pw,
        &[json!({"id": "d-1", "cmd": "deploy", "device": dev, "app": app}).to_string()],
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    let a = &answers[0];
    assert_eq!(
        (a["id"].clone(), a["ok"].clone(), a["status"].clone()),
        (json!("d-1"), json!(true), json!(202)),
        "{a}"
    );
    assert_eq!(a["result"]["op"], json!("deploy"), "{a}");
    assert_eq!(
        api.wait_op(&a["result"], TIMEOUT).await["status"],
        json!("succeeded")
    );
    assert!(container_running(&docker, &dev, &app).await);
    let state = sub_json(
        &orch,
        "nr",
        &op_pw,
        &format!("drover/v1/json/dev/{dev}/state"),
    )
    .await;
    assert_eq!(state["apps"][&app]["state"], json!("running"), "{state}");
    assert_eq!(
        state["apps"][&app]["containers"][0]["state"],
        json!("running"),
        "{state}"
    );

    // Reads through the same path; bad requests get JSON errors naming
    // what is wrong.
    let bad = [
        json!({"id": "r-1", "cmd": "device.get", "device": dev}).to_string(),
        "{not json".to_string(),
        format!(
            r#"{{"id": "big", "cmd": "deploy", "x": "{}"}}"#,
            "a".repeat(70_000)
        ),
        json!({"id": "u-1", "cmd": "reboot", "device": dev}).to_string(),
        json!({"id": "t-1", "cmd": "stop", "device": 7, "app": app}).to_string(),
        json!({"id": "f-1", "cmd": "stop", "device": dev, "app": app, "force": true}).to_string(),
        json!({"id": "n-1", "cmd": "stop", "device": "nope", "app": app}).to_string(),
        json!({"id": ["x"], "cmd": "apps.list"}).to_string(),
    ];
    let answers = requests(&orch, "nr", &op_pw, &bad).await;
    assert_eq!(
        answers.len(),
        bad.len(),
        "every request is answered: {answers:?}"
    );
    let by_id = |id: &str| {
        answers
            .iter()
            .find(|a| a["id"] == json!(id))
            .unwrap_or_else(|| panic!("no answer to {id}: {answers:?}"))
            .clone()
    };
    let got = by_id("r-1");
    assert_eq!(
        (got["ok"].clone(), got["result"]["id"].clone()),
        (json!(true), json!(dev)),
        "{got}"
    );
    assert_eq!(by_id("u-1")["error"]["code"], json!("unknown_command"));
    assert!(by_id("u-1")["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("deploy")));
    assert_eq!(by_id("t-1")["error"]["field"], json!("device"));
    assert_eq!(by_id("f-1")["error"]["field"], json!("force"));
    assert_eq!(by_id("n-1")["status"], json!(404));
    let anonymous: Vec<&Value> = answers.iter().filter(|a| a["id"].is_null()).collect();
    let codes: HashSet<&str> = anonymous
        .iter()
        .filter_map(|a| a["error"]["code"].as_str())
        .collect();
    assert_eq!(
        codes,
        HashSet::from(["malformed", "too_large", "invalid"]),
        "{anonymous:?}"
    );
    assert!(
        container_running(&docker, &dev, &app).await,
        "no bad request stopped it"
    );

    let spied = spy.await.expect("spy");
    assert!(
        spied.stdout.is_empty(),
        "another identity read nr's answers: {}",
        String::from_utf8_lossy(&spied.stdout)
    );

    // Every request that changed or tried to change something is in the
    // audit log under the identity's name.
    let (_, audit) = api.get("/api/v1/audit?limit=1000").await;
    let entries = audit.as_array().expect("audit list");
    let has = |actor: &str, command: Option<&str>, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"] == json!(actor)
                && command.is_none_or(|c| e["command"] == json!(c))
                && e["outcome"] == json!(outcome)
                && e["action"].as_str().is_some_and(|a| a.starts_with("mqtt"))
        })
    };
    assert!(has("auto:nr", Some("deploy"), "ok"), "{audit}");
    assert!(has("auto:watcher", Some("deploy"), "denied"), "{audit}");
    assert!(has("auto:nr", Some("stop"), "failed"), "{audit}");
    assert!(
        has("auto:nr", None, "failed"),
        "the malformed ones too: {audit}"
    );
    let (_, text) = api.get("/metrics").await;
    let text = text
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text.to_string());
    assert!(
        text.contains(r#"drover_mqtt_requests_total{outcome="refused"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_is_valid_and_announced_again() {
    let docker = docker().await;
    let orch = Orch::start_config(|cfg| {
        cfg.automation = AutomationConfig {
            homeassistant: Some(HomeAssistantConfig {
                user: "ha".into(),
                discovery: Default::default(),
            }),
            ..AutomationConfig::default()
        };
    })
    .await;
    let api = &orch.api;
    // The documented command (README, docs/protocol.md).
    let pw = mqtt_user(
        api,
        json!({
            "name": "ha", "role": "operator",
            "subscribe": ["drover/v1/json/dev/#", "drover/v1/json/fleet/#", "homeassistant/#"],
            "publish": ["homeassistant/status"],
        }),
    )
    .await;
    let agent = online_agent(&orch, "ha").await;
    let dev = agent.id.clone();
    let app = unique("sw");
    api.create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let (s, op) = api
        .post(&format!("/api/v1/devices/{dev}/apps"), &json!({"app": app}))
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        api.wait_op(&op, TIMEOUT).await["status"],
        json!("succeeded")
    );

    let configs = wait_for(Duration::from_secs(20), "discovery configs", || async {
        let (msgs, _) = sub(&orch, "ha", &pw, &["homeassistant/+/+/+/config"], 4, 5).await;
        (msgs
            .iter()
            .filter(|(t, p)| t.contains(&dev.replace('.', "_")) && !p.is_empty())
            .count()
            >= 4)
            .then_some(msgs)
    })
    .await;
    let mut unique_ids = HashSet::new();
    let mut components = Vec::new();
    for (topic, payload) in &configs {
        let c: Value = serde_json::from_str(payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        let component = topic.split('/').nth(1).expect("component").to_string();
        // Required by Home Assistant's MQTT discovery for these components.
        let required: &[&str] = match component.as_str() {
            "sensor" => &[
                "state_topic",
                "unique_id",
                "name",
                "device",
                "availability",
                "value_template",
                "unit_of_measurement",
            ],
            "switch" => &[
                "command_topic",
                "state_topic",
                "unique_id",
                "name",
                "device",
                "availability",
                "payload_on",
                "payload_off",
                "value_template",
                "state_on",
                "state_off",
            ],
            other => panic!("unexpected component {other}"),
        };
        for k in required {
            assert!(!c[*k].is_null(), "{topic} lacks {k}: {c}");
        }
        assert!(
            c["device"]["identifiers"]
                .as_array()
                .is_some_and(|i| !i.is_empty()),
            "{c}"
        );
        assert!(
            unique_ids.insert(c["unique_id"].as_str().expect("string").to_string()),
            "unique_id twice: {c}"
        );
        // The topics it reads exist and carry JSON with the fields its
        // templates name.
        let avail = &c["availability"][0];
        let status = sub_json(&orch, "ha", &pw, avail["topic"].as_str().expect("topic")).await;
        assert_eq!(status["status"], avail["payload_available"], "{status}");
        let state_topic = c["state_topic"].as_str().expect("topic");
        let mut state = sub_json(&orch, "ha", &pw, state_topic).await;
        if component == "switch" {
            // The mirror republishes a device's state document at most
            // 250 ms after the report that ended the deploy, which may be
            // after the operation is seen to succeed.
            state = wait_for(TIMEOUT, "the app running in the state document", || async {
                let s = sub_json(&orch, "ha", &pw, state_topic).await;
                (s["apps"][&app]["running"] == json!(true)).then_some(s)
            })
            .await;
        }
        let template = c["value_template"].as_str().expect("template");
        if component == "sensor" {
            let field = template
                .trim_start_matches("{{ value_json.")
                .trim_end_matches(" }}");
            assert!(state[field].is_number(), "{template} on {state}");
        } else {
            assert!(
                template.contains(&format!("value_json.apps['{app}'].running")),
                "{template}"
            );
            assert_eq!(state["apps"][&app]["running"], json!(true), "{state}");
            assert_eq!(c["command_topic"], json!("drover/v1/json/req/ha"));
            let off: Value = serde_json::from_str(c["payload_off"].as_str().expect("off"))
                .expect("JSON request");
            assert_eq!(
                (off["cmd"].clone(), off["app"].clone()),
                (json!("stop"), json!(app))
            );
        }
        components.push(component);
    }
    components.sort();
    assert_eq!(
        components,
        ["sensor", "sensor", "sensor", "switch"],
        "{configs:?}"
    );

    // The switch, as Home Assistant would use it: payload_off stops the
    // container (checked through Docker).
    let switch = configs
        .iter()
        .map(|(_, p)| serde_json::from_str::<Value>(p).expect("json"))
        .find(|c| !c["payload_off"].is_null())
        .expect("a switch");
    mosquitto_pub_as(
        &orch,
        "ha",
        &pw,
        "drover/v1/json/req/ha",
        switch["payload_off"].as_str().expect("off"),
    )
    .await;
    wait_for(TIMEOUT, "the switch stops the app", || async {
        (!container_running(&docker, &dev, &app).await).then_some(())
    })
    .await;

    // Home Assistant's birth message makes Drover announce every config
    // again, to subscribers already there.
    let again = tokio::spawn({
        let (host, port, pw) = (orch.mqtt_host.clone(), orch.mqtt_port, pw.clone());
        async move {
            tokio::process::Command::new("mosquitto_sub")
                .args([
                    "-h",
                    &host,
                    "-p",
                    &port.to_string(),
                    "-u",
                    "$auto:ha",
                    "-P",
                    &pw,
                ])
                .args([
                    "-t",
                    "homeassistant/sensor/+/+/config",
                    "-v",
                    "-R",
                    "-C",
                    "3",
                    "-W",
                    "20",
                ])
                .output()
                .await
                .expect("mosquitto_sub")
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    mosquitto_pub_as(&orch, "ha", &pw, "homeassistant/status", "online").await;
    let out = again.await.expect("sub");
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        lines,
        3,
        "re-announced sensors: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn mosquitto_pub_as(orch: &Orch, name: &str, pw: &str, topic: &str, payload: &str) {
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &orch.mqtt_host, "-p", &orch.mqtt_port.to_string()])
        .args([
            "-u",
            &format!("$auto:{name}"),
            "-P",
            pw,
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .output()
        .await
        .expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With an external broker the JSON tree is published, but requests are
/// off: nothing there makes `json/req/<name>` speak for `<name>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_external_broker_json_is_mirrored_and_requests_are_off() {
    let mosq = Mosquitto::start().await;
    let orch = Orch::start_with(drover::server::BrokerMode::External {
        host: "127.0.0.1".into(),
        port: mosq.port,
    })
    .await;
    let agent = online_agent(&orch, "ext").await;
    let dev = agent.id.clone();
    let plain = |topic: String, secs: u64| {
        let port = mosq.port;
        async move {
            let out = tokio::process::Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", &topic])
                .args(["-C", "1", "-W", &secs.to_string()])
                .output()
                .await
                .expect("mosquitto_sub");
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    let status: Value = serde_json::from_str(
        plain(format!("drover/v1/json/dev/{dev}/status"), 20)
            .await
            .trim(),
    )
    .expect("JSON status");
    assert_eq!(status["online"], json!(true), "{status}");
    let before = operations(&orch.api, &dev).await.len();
    let answer = tokio::spawn(plain("drover/v1/json/res/x".into(), 6));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let request = json!({"id": "1", "cmd": "stop", "device": dev, "app": "any"}).to_string();
    mosquitto_pub(mosq.port, "drover/v1/json/req/x", request.as_bytes(), false).await;
    assert_eq!(
        answer.await.expect("sub"),
        "",
        "no answer with an external broker"
    );
    assert_eq!(operations(&orch.api, &dev).await.len(), before);
}

/// `drover serve --json-mirror=false`: nothing is published in the JSON
/// tree while devices report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_mirror_can_be_turned_off() {
    let orch = Orch::start_config(|cfg| cfg.automation.json_mirror = false).await;
    let agent = online_agent(&orch, "nomirror").await;
    let pw = mqtt_user(&orch.api, json!({"name": "quiet"})).await;
    let (json_msgs, _) = sub(&orch, "quiet", &pw, &["drover/v1/json/dev/#"], 1, 5).await;
    assert!(json_msgs.is_empty(), "{json_msgs:?}");
    let topic = format!("drover/v1/dev/{}/telemetry", agent.id);
    let (cbor, err) = sub(&orch, "quiet", &pw, &[&topic], 1, 10).await;
    // Counted by topic: the CBOR payload is binary, and a newline byte in
    // it splits the printed message into more lines.
    let reports = cbor.iter().filter(|(t, _)| *t == topic).count();
    assert_eq!(reports, 1, "the device reports meanwhile: {err}");
}

/// Rules are managed over MQTT like over REST: an operator identity
/// creates, reads, replaces and deletes one; a bad condition is refused
/// naming the field; a viewer may list but not create; the audit log has
/// the changes under the identity's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_managed_over_mqtt() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let op_pw = mqtt_user(api, json!({"name": "ruler", "role": "operator"})).await;
    let view_pw = mqtt_user(api, json!({"name": "peeker"})).await;
    let rule = json!({
        "name": "echo",
        "trigger": {"type": "mqtt", "filter": "plant/in"},
        "condition": "message.json.level > 3",
        "actions": [{"type": "publish", "topic": "plant/out", "payload": {"alarm": true}}],
        "cooldown_secs": 5,
    });
    let with = |id: &str, cmd: &str, extra: &Value| {
        let mut v = json!({"id": id, "cmd": cmd});
        for (k, x) in extra.as_object().expect("object") {
            v[k] = x.clone();
        }
        v.to_string()
    };
    let mut bad = rule.clone();
    bad["name"] = json!("broken");
    bad["condition"] = json!("message.json.level >");
    let mut replaced = rule.clone();
    replaced["cooldown_secs"] = json!(9);
    // One step at a time: requests are answered concurrently, so a batch
    // has no order.
    let mut answers = Vec::new();
    for step in [
        vec![
            with("c", "rule.create", &rule),
            with("b", "rule.create", &bad),
        ],
        vec![
            with("l", "rules.list", &json!({})),
            with("u", "rule.update", &replaced),
        ],
        vec![
            with("g", "rule.get", &json!({"rule": "echo"})),
            with(
                "f",
                "rule_firings.list",
                &json!({"rule": "echo", "limit": 5}),
            ),
        ],
        vec![with("d", "rule.delete", &json!({"rule": "echo"}))],
        vec![with("g2", "rule.get", &json!({"rule": "echo"}))],
    ] {
        answers.extend(requests(&orch, "ruler", &op_pw, &step).await);
    }
    let by_id = |id: &str| {
        answers
            .iter()
            .find(|a| a["id"] == json!(id))
            .unwrap_or_else(|| panic!("no answer to {id}: {answers:?}"))
            .clone()
    };
    assert_eq!(by_id("c")["status"], 201, "{:?}", by_id("c"));
    assert_eq!(by_id("c")["result"]["name"], "echo");
    let b = by_id("b");
    assert_eq!(
        (b["ok"].clone(), b["status"].clone()),
        (json!(false), json!(400)),
        "{b}"
    );
    assert_eq!(b["error"]["field"], "condition", "{b}");
    assert!(by_id("l")["result"]
        .as_array()
        .is_some_and(|l| l.iter().any(|r| r["name"] == "echo")));
    assert_eq!(by_id("u")["status"], 200, "{:?}", by_id("u"));
    assert_eq!(by_id("g")["result"]["cooldown_secs"], 9);
    assert_eq!(by_id("f")["result"], json!([]));
    assert_eq!(by_id("d")["status"], 204, "{:?}", by_id("d"));
    assert_eq!(by_id("g2")["status"], 404, "{:?}", by_id("g2"));
    let (_, rest) = api.get("/api/v1/rules").await;
    assert_eq!(rest, json!([]), "deleted over MQTT, gone over REST");

    let answers = requests(
        &orch,
        "peeker",
        &view_pw,
        &[
            with("l", "rules.list", &json!({})),
            with("c", "rule.create", &rule),
        ],
    )
    .await;
    let l = answers
        .iter()
        .find(|a| a["id"] == "l")
        .expect("list answer");
    assert_eq!(l["status"], 200, "{l}");
    let c = answers
        .iter()
        .find(|a| a["id"] == "c")
        .expect("create answer");
    assert_eq!(
        (c["status"].clone(), c["error"]["code"].clone()),
        (json!(403), json!("forbidden")),
        "{c}"
    );
    let (_, rest) = api.get("/api/v1/rules").await;
    assert_eq!(rest, json!([]), "the viewer created nothing");

    let (_, audit) = api.get("/api/v1/audit?limit=1000").await;
    let entries = audit.as_array().expect("audit list");
    for (actor, outcome) in [("auto:ruler", "ok"), ("auto:peeker", "denied")] {
        assert!(
            entries.iter().any(|e| e["actor"] == json!(actor)
                && e["outcome"] == json!(outcome)
                && e["action"].as_str().is_some_and(|a| a.starts_with("mqtt"))),
            "{actor} {outcome}: {audit}"
        );
    }
    orch.stop().await;
}
