//! Private registries end to end: the registry on 127.0.0.1:5001 refuses
//! anonymous pulls (`scripts/test-env.sh`), an app from it retries as
//! unauthorized until credentials are stored through the CLI, then runs;
//! and the password shows up nowhere but on the wire to that one device and
//! in its `secrets.cbor`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use drover_shared::payload::Secrets;
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;
use drover_tests::*;
use serde_json::{json, Value};

const PASSWORD: &str = AUTH_REGISTRY_PASSWORD;
/// Debug everywhere: a password logged at any level fails the test.
const LOG_FILTER: &str = "debug";

async fn online(api: &Api, id: &str) {
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(id).await.filter(|d| d["online"] == json!(true))
    })
    .await;
}

fn app_status(device: &Value, app: &str) -> Option<Value> {
    device["observed"]["apps"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == json!(app))
        .cloned()
}

/// The retained message on `topic`, read by an MQTT client of the test's
/// own that logs in with `agent`'s credential (only a device itself may
/// read its secrets topic); `None` when there is none.
async fn retained(port: u16, agent: &Agent, topic: &str) -> Option<Vec<u8>> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let cred: Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir.path().join("credential")).expect("credential file"),
    )
    .expect("credential json");
    let mut opts = MqttOptions::new(agent.id.clone(), "127.0.0.1", port);
    opts.set_credentials(
        agent.id.clone(),
        cred["password"].as_str().expect("password"),
    );
    opts.set_max_packet_size(300_000, 300_000);
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                    return p.payload.to_vec();
                }
                Ok(_) => {}
                Err(e) => panic!("spy client: {e}"),
            }
        }
    })
    .await
    .ok();
    let _ = client.disconnect().await;
    got
}

fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "the registry password leaked into {what}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_pull_needs_credentials_and_they_leak_nowhere() {
    let docker = docker().await;
    let orch = OrchProc::start_logged(LOG_FILTER).await;
    let api = &orch.api;
    let dev = unique("priv");
    let bystander = unique("bystander");
    let agent = Agent::spawn_logged(&orch.broker_url(), &dev, LOG_FILTER);
    let other = Agent::spawn_logged(&orch.broker_url(), &bystander, LOG_FILTER);
    online(api, &agent.id).await;
    online(api, &other.id).await;

    // No local copy under the private name, so the agent has to ask 5001.
    let image = format!("{AUTH_REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    untag(&image);

    // The bystander runs something from the open registry only.
    let open_app = unique("open");
    api.create_app(&open_app, &fresh_image(&unique("open")).await)
        .await;
    let (s, v) = api
        .post(
            &format!("/api/v1/devices/{bystander}/apps"),
            &json!({"app": open_app}),
        )
        .await;
    assert_eq!(s, 202, "{v}");

    let app = unique("private");
    api.create_app(&app, &image).await;
    let (s, op) = api
        .post(&format!("/api/v1/devices/{dev}/apps"), &json!({"app": app}))
        .await;
    assert_eq!(s, 202, "{op}");

    // Without credentials: retrying, and the error says unauthorized.
    let status = wait_for(
        Duration::from_secs(60),
        "the app retrying as unauthorized",
        || async {
            let d = api.device(&dev).await?;
            app_status(&d, &app).filter(|a| a["phase"] == json!("retrying"))
        },
    )
    .await;
    let error = status["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("unauthorized"), "{status}");
    assert!(error.contains(AUTH_REGISTRY), "{status}");
    let (_, op_now) = api
        .get(&format!(
            "/api/v1/operations/{}",
            op["id"].as_str().expect("id")
        ))
        .await;
    assert!(
        !matches!(op_now["status"].as_str(), Some("failed" | "succeeded")),
        "the operation stays open while retrying: {op_now}"
    );

    // Bad input is refused naming the field, before anything is stored.
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            "/api/v1/registries/http:%2F%2Fx",
            &json!({"username": "u", "password": "p"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("host")),
        "{v}"
    );
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/registries/{AUTH_REGISTRY}"),
            &json!({"username": AUTH_REGISTRY_USER, "password": ""}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("password")),
        "{v}"
    );
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/registries/{AUTH_REGISTRY}"),
            &json!({"username": "", "password": PASSWORD}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("username")),
        "{v}"
    );
    assert_no_password("a 400 response", &v.to_string());

    // The CLI takes the password on standard input, never as an argument.
    let (ok, set_out, err) = drover_cli(
        api,
        &[
            "registries",
            "set",
            AUTH_REGISTRY,
            "--username",
            AUTH_REGISTRY_USER,
            "--password-stdin",
        ],
        format!("{PASSWORD}\n").as_bytes(),
    )
    .await;
    assert!(ok, "registries set: {err}");
    assert!(set_out.contains(AUTH_REGISTRY), "{set_out}");

    wait_converged(api, &docker, &dev, Duration::from_secs(60)).await;
    let d = api.device(&dev).await.expect("device");
    assert_eq!(
        app_status(&d, &app).expect("app")["phase"],
        json!("running"),
        "{d}"
    );

    // ---- the password is nowhere it should not be --------------------------
    let op_id = op["id"].as_str().expect("id").to_string();
    let mut seen: Vec<(String, String)> = Vec::new();
    for path in [
        "/api/v1/devices".to_string(),
        format!("/api/v1/devices/{dev}"),
        format!("/api/v1/devices/{bystander}"),
        "/api/v1/apps".to_string(),
        format!("/api/v1/apps/{app}"),
        "/api/v1/operations?limit=10000".to_string(),
        format!("/api/v1/operations/{op_id}"),
        format!("/api/v1/devices/{dev}/events"),
        format!("/api/v1/devices/{dev}/logs?app={app}"),
        "/api/v1/registries".to_string(),
        format!("/api/v1/registries/{AUTH_REGISTRY}"),
        // Every change, including the PUT that carried the password.
        "/api/v1/audit?limit=10000".to_string(),
    ] {
        let (s, v) = api.get(&path).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        seen.push((format!("GET {path}"), v.to_string()));
    }
    let (_, regs) = api.get("/api/v1/registries").await;
    assert_eq!(
        regs,
        json!([{"host": AUTH_REGISTRY, "username": AUTH_REGISTRY_USER,
                 "password_set": true, "updated_at_ms": regs[0]["updated_at_ms"]}]),
    );

    seen.push(("registries set output".into(), set_out));
    for args in [
        vec!["devices"],
        vec!["devices", "show", &dev],
        vec!["apps"],
        vec!["apps", "show", &app],
        vec!["ops"],
        vec!["ops", "show", &op_id],
        vec!["logs", &app, "--device", &dev],
        vec!["registries"],
        vec!["registries", "show", AUTH_REGISTRY],
        vec!["audit", "--limit", "10000"],
    ] {
        for json_out in [false, true] {
            let mut full = args.clone();
            if json_out {
                full.extend(["-o", "json"]);
            }
            let (ok, out, err) = drover_cli(api, &full, b"").await;
            assert!(ok, "drover {}: {err}", full.join(" "));
            seen.push((format!("drover {}", full.join(" ")), out + &err));
        }
    }
    let (_, regs_table, _) = drover_cli(api, &["registries"], b"").await;
    assert!(
        regs_table.contains(AUTH_REGISTRY) && regs_table.contains(AUTH_REGISTRY_USER),
        "{regs_table}"
    );

    // Log capture works: both processes logged about the registry.
    let orch_log = orch.log_text();
    let agent_log = agent.log_text();
    assert!(
        orch_log.contains("registry credentials stored"),
        "orchestrator output not captured:\n{orch_log}"
    );
    assert!(
        agent_log.contains("registry credentials updated") && agent_log.contains(AUTH_REGISTRY),
        "agent output not captured:\n{agent_log}"
    );
    seen.push(("the orchestrator's log".into(), orch_log));
    seen.push(("the agent's log".into(), agent_log));
    seen.push(("the bystander agent's log".into(), other.log_text()));

    // Agent state files: only secrets.cbor may hold it, owner-only.
    let secrets_file = agent.state_dir.path().join("secrets.cbor");
    let mode = std::fs::metadata(&secrets_file)
        .expect("secrets.cbor exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secrets.cbor mode {mode:o}");
    let stored: Secrets =
        drover_shared::decode(&std::fs::read(&secrets_file).expect("read")).expect("decodes");
    assert_eq!(stored.hosts(), [AUTH_REGISTRY]);
    for a in [&agent, &other] {
        for entry in std::fs::read_dir(a.state_dir.path()).expect("state dir") {
            let path = entry.expect("entry").path();
            if path == secrets_file || !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).expect("read state file");
            seen.push((
                format!("state file {}", path.display()),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    // The orchestrator's data directory holds it only in its redb file
    // (the `registries` table, in clear, as SECURITY.md says).
    for entry in std::fs::read_dir(orch.data.path()).expect("data dir") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n == "drover.redb") || !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read data file");
        seen.push((
            format!("data file {}", path.display()),
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
    }
    // Docker got it for the pull only: not in the container's config.
    let inspect = docker_cli(&["inspect", &agent.container_name(&app, "main")]).await;
    assert!(inspect.contains(AUTH_REGISTRY), "{inspect}");
    seen.push(("docker inspect of the container".into(), inspect));
    for (what, text) in &seen {
        assert_no_password(what, text);
    }

    // Over MQTT: the device's own retained secrets carry the credentials;
    // the bystander, which pulls nothing from 5001, gets none of them.
    let topics = Topics::default();
    let mine = retained(
        orch.mqtt_port,
        &agent,
        &topics.device(&DeviceId::new(&dev).expect("id"), TopicKind::Secrets),
    )
    .await
    .expect("the device's retained secrets");
    let mine: Secrets = drover_shared::decode(&mine).expect("decodes");
    assert_eq!(
        mine.for_host(AUTH_REGISTRY).map(|c| c.password.as_str()),
        Some(PASSWORD)
    );
    let theirs = retained(
        orch.mqtt_port,
        &other,
        &topics.device(&DeviceId::new(&bystander).expect("id"), TopicKind::Secrets),
    )
    .await;
    if let Some(bytes) = theirs {
        assert_no_password(
            "the bystander's secrets topic",
            &String::from_utf8_lossy(&bytes),
        );
        let s: Secrets = drover_shared::decode(&bytes).expect("decodes");
        assert!(s.registries.is_empty(), "{s:?}");
    }

    // Deleting the credentials takes them off the device too.
    let (ok, _, err) = drover_cli(api, &["registries", "delete", AUTH_REGISTRY], b"").await;
    assert!(ok, "{err}");
    wait_for(
        Duration::from_secs(15),
        "the device to drop the credentials",
        || async {
            let bytes = std::fs::read(&secrets_file).ok()?;
            let s: Secrets = drover_shared::decode(&bytes).ok()?;
            s.registries.is_empty().then_some(())
        },
    )
    .await;
    let (s, _) = api
        .get(&format!("/api/v1/registries/{AUTH_REGISTRY}"))
        .await;
    assert_eq!(s, 404);

    // The desired state in redb never held it either.
    let mut orch = orch;
    orch.kill().await;
    let store = drover::store::Store::open(&orch.data.path().join("drover.redb"))
        .expect("open the orchestrator's store");
    let desired = serde_json::to_string(&store.desired().expect("desired")).expect("json");
    assert!(desired.contains(&app), "the desired table was read");
    assert_no_password("the redb desired table", &desired);
    let ops = serde_json::to_string(&store.operations().expect("operations")).expect("json");
    assert_no_password("the redb operations table", &ops);
    untag(&image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_never_takes_the_password_as_an_argument() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let (ok, _, err) = drover_cli(
        api,
        &[
            "registries",
            "set",
            AUTH_REGISTRY,
            "-u",
            "x",
            "--password",
            "pw",
        ],
        b"",
    )
    .await;
    assert!(!ok, "--password must not exist");
    assert!(err.contains("--password"), "{err}");
    // Neither stdin nor the environment: a clear error, nothing stored.
    let (ok, _, err) = drover_cli(api, &["registries", "set", AUTH_REGISTRY, "-u", "x"], b"").await;
    assert!(!ok);
    assert!(err.contains("--password-stdin"), "{err}");
    let (_, regs) = api.get("/api/v1/registries").await;
    assert_eq!(regs, json!([]));
    orch.stop().await;
}
