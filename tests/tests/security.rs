//! Device identity, broker-enforced topic isolation, revocation, and REST
//! access control — checked from the outside: Debian's mosquitto_pub and
//! mosquitto_sub play the attacker with a real device's credentials, real
//! agents enroll over MQTT, and the REST API is called with tokens of each
//! role.

use std::time::Duration;

use drover_shared::model::DesiredState;
use drover_shared::payload::{Action, Command, Op, Status, Telemetry};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{encode, DeviceId, Name};
use drover_tests::*;
use serde_json::{json, Value};

async fn online(api: &Api, id: &str) -> Value {
    wait_for(
        Duration::from_secs(30),
        &format!("device {id} online"),
        || async {
            api.device(id)
                .await
                .filter(|d| d["online"] == json!(true) && d["inventory"].is_object())
        },
    )
    .await
}

/// The password an agent stored at enrollment.
fn password_of(agent: &Agent) -> String {
    let raw = std::fs::read(agent.state_dir.path().join("credential")).expect("credential file");
    let v: Value = serde_json::from_slice(&raw).expect("credential json");
    v["password"].as_str().expect("password").to_string()
}

struct Login<'a> {
    user: &'a str,
    pass: &'a str,
    client_id: &'a str,
}

/// mosquitto_pub with QoS 1; returns (exit code, stderr).
async fn publish_as(
    port: u16,
    login: Option<&Login<'_>>,
    topic: &str,
    payload: &[u8],
) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payload");
    std::fs::write(&file, payload).expect("payload");
    let mut cmd = tokio::process::Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ])
    .arg("-f")
    .arg(&file);
    if let Some(l) = login {
        cmd.args(["-u", l.user, "-P", l.pass, "-i", l.client_id]);
    }
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .expect("mosquitto_pub finished")
        .expect("mosquitto_pub is not installed; run `bash scripts/test-env.sh`");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// mosquitto_sub for up to `secs` seconds, at most one message; returns
/// (exit code, what it printed).
async fn subscribe_as(port: u16, login: &Login<'_>, filter: &str, secs: u32) -> (i32, String) {
    let out = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            filter,
        ])
        .args(["-u", login.user, "-P", login.pass, "-i", login.client_id])
        .args(["-C", "1", "-W", &secs.to_string(), "-F", "%t"])
        .output()
        .await
        .expect("mosquitto_sub is not installed; run `bash scripts/test-env.sh`");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_touch_another_devices_topics() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let a = Agent::spawn(&orch.broker_url(), &unique("sec-a"));
    let b = Agent::spawn(&orch.broker_url(), &unique("sec-b"));
    online(&orch.api, &a.id).await;
    online(&orch.api, &b.id).await;

    // B runs an app, so a forged command would visibly change something.
    let image = fresh_image(&unique("sec")).await;
    let app = unique("secapp");
    orch.api.create_app(&app, &image).await;
    let (s, op) = orch
        .api
        .post(
            &format!("/api/v1/devices/{}/apps", b.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        orch.api.wait_op(&op, Duration::from_secs(120)).await["status"],
        json!("succeeded")
    );
    wait_converged(&orch.api, &docker, &b.id, Duration::from_secs(60)).await;
    let before = orch.api.device(&b.id).await.expect("b");

    let topics = Topics::default();
    let b_id = DeviceId::new(b.id.clone()).expect("id");
    let pass = password_of(&a);
    let as_a = Login {
        user: &a.id,
        pass: &pass,
        client_id: &a.id,
    };
    let violations = metric(&orch.api, "drover_broker_acl_violations_total").await;

    // A forged, well-formed command that would remove B's app.
    let forged_cmd = encode(&Command {
        id: "forged".into(),
        issued_at_ms: 1,
        action: Action::Apply {
            op: Op::Remove,
            app: Name::new(app.clone()).expect("name"),
            desired: DesiredState {
                generation: 10_000,
                apps: vec![],
            },
        },
    });
    let forged_status = encode(&Status {
        online: false,
        at_ms: 1,
    });
    let forged_telemetry = encode(&Telemetry {
        at_ms: 4_242_424_242,
        ..Default::default()
    });
    let attempts = [
        (TopicKind::Cmd, forged_cmd),
        (
            TopicKind::Desired,
            encode(&drover_shared::payload::Desired {
                state: DesiredState {
                    generation: 10_000,
                    apps: vec![],
                },
            }),
        ),
        (TopicKind::Status, forged_status),
        (TopicKind::Telemetry, forged_telemetry),
    ];
    for (kind, payload) in &attempts {
        let (code, err) = publish_as(
            orch.mqtt_port,
            Some(&as_a),
            &topics.device(&b_id, *kind),
            payload,
        )
        .await;
        // QoS 1: the broker closes the connection instead of acknowledging.
        assert_ne!(code, 0, "publishing on B's {kind} as A was accepted: {err}");
    }
    for filter in [
        topics.device(&b_id, TopicKind::Cmd),
        topics.device(&b_id, TopicKind::Secrets),
        topics.device(&b_id, TopicKind::Telemetry),
        topics.all_devices(TopicKind::Cmd),
        topics.everything(),
        "#".to_string(),
    ] {
        let (code, got) = subscribe_as(orch.mqtt_port, &as_a, &filter, 3).await;
        assert!(
            got.is_empty(),
            "A subscribed to {filter} and received {got:?}"
        );
        assert_ne!(code, 0, "subscribing to {filter} as A did not fail");
    }
    let after_violations = metric(&orch.api, "drover_broker_acl_violations_total").await;
    assert!(
        after_violations >= violations + 10,
        "each refused publish/subscribe is counted: {violations} -> {after_violations}"
    );

    // B is untouched: still online, same generation, app still running,
    // telemetry never the forged sample.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = online(&orch.api, &b.id).await;
    assert_eq!(now["desired_generation"], before["desired_generation"]);
    assert_eq!(now["applied_generation"], before["applied_generation"]);
    assert_ne!(now["telemetry"]["at_ms"], json!(4_242_424_242u64));
    converged(&orch.api, &docker, &b.id)
        .await
        .expect("B still runs its app");
    let running = docker
        .inspect_container(
            &b.container_name(&app, "main"),
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("B's container exists");
    assert_eq!(running.state.and_then(|s| s.running), Some(true));

    // A's own topics still work for A.
    let (code, err) = publish_as(
        orch.mqtt_port,
        Some(&as_a),
        &topics.device(
            &DeviceId::new(a.id.clone()).expect("id"),
            TopicKind::Telemetry,
        ),
        &encode(&Telemetry::default()),
    )
    .await;
    assert_eq!(code, 0, "A publishing its own telemetry: {err}");
    untag(&image);
    drop((a, b));
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_wrong_and_revoked_credentials_are_refused() {
    let orch = Orch::start().await;
    let mut b = Agent::spawn(&orch.broker_url(), &unique("sec-rev"));
    online(&orch.api, &b.id).await;
    let pass = password_of(&b);
    let topic = "drover/v1/dev/x/telemetry";
    let failures = metric(&orch.api, "drover_broker_auth_failures_total").await;

    let (code, err) = publish_as(orch.mqtt_port, None, topic, b"x").await;
    assert_ne!(code, 0);
    assert!(err.contains("not authorised"), "no credentials: {err}");
    let wrong = Login {
        user: &b.id,
        pass: "not-the-password",
        client_id: &b.id,
    };
    let (code, err) = publish_as(orch.mqtt_port, Some(&wrong), topic, b"x").await;
    assert_ne!(code, 0);
    assert!(err.contains("not authorised"), "wrong password: {err}");
    let unknown = Login {
        user: "never-enrolled",
        pass: &pass,
        client_id: "never-enrolled",
    };
    let (code, err) = publish_as(orch.mqtt_port, Some(&unknown), topic, b"x").await;
    assert!(
        code != 0 && err.contains("not authorised"),
        "unknown device: {err}"
    );
    // Someone else's password under another client id.
    let borrowed = Login {
        user: &b.id,
        pass: &pass,
        client_id: "someone-else",
    };
    let (code, err) = publish_as(orch.mqtt_port, Some(&borrowed), topic, b"x").await;
    assert!(
        code != 0 && err.contains("not authorised"),
        "foreign client id: {err}"
    );
    assert!(metric(&orch.api, "drover_broker_auth_failures_total").await >= failures + 4);

    // A viewer or operator may not revoke; an admin may, and the device is
    // disconnected at once and stays out.
    let viewer = orch.api.as_role("v", "viewer").await;
    let (s, _) = viewer
        .post(&format!("/api/v1/devices/{}/revoke", b.id), &Value::Null)
        .await;
    assert_eq!(s, 403);
    let (s, v) = orch
        .api
        .post(&format!("/api/v1/devices/{}/revoke", b.id), &Value::Null)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["credential"], json!("revoked"));
    wait_for(
        Duration::from_secs(10),
        "revoked device offline",
        || async {
            orch.api
                .device(&b.id)
                .await
                .filter(|d| d["online"] == json!(false))
        },
    )
    .await;
    let own = Login {
        user: &b.id,
        pass: &pass,
        client_id: &b.id,
    };
    let (code, err) = publish_as(orch.mqtt_port, Some(&own), topic, b"x").await;
    assert!(
        code != 0 && err.contains("not authorised"),
        "revoked credential: {err}"
    );
    // The agent keeps trying and keeps being refused.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let d = orch.api.device(&b.id).await.expect("device");
    assert_eq!(d["online"], json!(false));
    assert_eq!(d["credential"], json!("revoked"));

    // A token for anyone cannot bring it back; one made for it can.
    let (s, any) = orch
        .api
        .post("/api/v1/enrollment-tokens", &json!({"uses": 1}))
        .await;
    assert_eq!(s, 201);
    let token = any["token"].as_str().expect("token");
    let enroll = Login {
        user: "$enroll",
        pass: token,
        client_id: &b.id,
    };
    let (code, err) = publish_as(orch.mqtt_port, Some(&enroll), topic, b"x").await;
    assert!(
        code != 0 && err.contains("not authorised"),
        "generic token for a revoked device: {err}"
    );
    b.kill().await;
    std::fs::remove_file(b.state_dir.path().join("credential")).expect("remove credential");
    b.start(&orch.broker_url());
    let d = online(&orch.api, &b.id).await;
    assert_eq!(d["credential"], json!("active"));
    assert_ne!(password_of(&b), pass, "re-enrollment issues a new password");
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_single_use_pinned_and_expire() {
    let orch = Orch::start().await;
    let new_token = |body: Value| {
        let api = orch.api.clone();
        async move {
            let (s, v) = api.post("/api/v1/enrollment-tokens", &body).await;
            assert_eq!(s, 201, "{v}");
            v["token"].as_str().expect("token").to_string()
        }
    };
    let bad = |body: Value, field: &'static str| {
        let api = orch.api.clone();
        async move {
            let (s, v) = api.post("/api/v1/enrollment-tokens", &body).await;
            assert_eq!(s, 400, "{body}: {v}");
            assert_eq!(v["error"]["field"], json!(field), "{v}");
        }
    };
    bad(json!({"ttl_secs": 0}), "ttl_secs").await;
    bad(json!({"uses": 0}), "uses").await;
    bad(json!({"device_id": "no spaces"}), "device_id").await;
    bad(json!({"ttl": 5}), "ttl").await;

    // A real agent enrolls with a token from a file; the credential is
    // private to its user and the token is used up.
    let id = unique("enr");
    let token = new_token(json!({"uses": 1})).await;
    let state = tempfile::tempdir().expect("tempdir");
    let token_file = state.path().join("token");
    std::fs::write(&token_file, &token).expect("token file");
    let mut agent = tokio::process::Command::new(binary("drover-agent"))
        .args(["--broker", &orch.broker_url(), "--device-id", &id])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--enroll-token-file")
        .arg(&token_file)
        .env_remove("DROVER_ENROLL_TOKEN")
        .kill_on_drop(true)
        .spawn()
        .expect("agent");
    online(&orch.api, &id).await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path().join("credential"))
            .expect("credential written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "credential file mode");
    }
    let (_, list) = orch.api.get("/api/v1/enrollment-tokens").await;
    let listed = list
        .as_array()
        .expect("list")
        .iter()
        .find(|t| token.contains(t["id"].as_str().unwrap_or("?")))
        .expect("token listed");
    assert_eq!(listed["uses_left"], json!(0));
    assert!(
        listed.get("token").is_none(),
        "a listing never shows the token: {listed}"
    );
    let _ = agent.kill().await;

    // Used up, expired, pinned to someone else, or garbage: the agent stops
    // with a clear error instead of retrying forever.
    let expired = new_token(json!({"ttl_secs": 1})).await;
    let pinned = new_token(json!({"device_id": "somebody-else"})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (what, t) in [
        ("used up", token.as_str()),
        ("expired", expired.as_str()),
        ("pinned to another device", pinned.as_str()),
        ("garbage", "et.nope.nope"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(binary("drover-agent"))
                .args([
                    "--broker",
                    &orch.broker_url(),
                    "--device-id",
                    &unique("enr-bad"),
                ])
                .arg("--state-dir")
                .arg(dir.path())
                .env("DROVER_ENROLL_TOKEN", t)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("agent with a {what} token did not give up"))
        .expect("agent ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} token accepted");
        assert!(err.contains("enrollment refused"), "{what}: {err}");
        assert!(!dir.path().join("credential").exists());
    }
    // The audit log has the enrollment.
    let (_, log) = orch
        .api
        .get(&format!("/api/v1/audit?actor=device:{id}"))
        .await;
    assert_eq!(log[0]["action"], json!("mqtt enroll"), "{log}");
    assert_eq!(log[0]["outcome"], json!("ok"));
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_needs_a_token_and_the_right_role_and_audits_attempts() {
    let orch = Orch::start().await;
    let admin = &orch.api;
    let anonymous = admin.with_token(None);
    let forged = admin.with_token(Some("at.0000.1111"));
    let viewer = admin.as_role("watcher", "viewer").await;
    let operator = admin.as_role("deployer", "operator").await;
    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    admin.create_app("audited", &image).await;

    // No token, a bad token: 401 with a Bearer challenge; health and
    // metrics stay open for probes and Prometheus.
    let (s, v) = anonymous.get("/api/v1/devices").await;
    assert_eq!(s, 401, "{v}");
    let resp = reqwest::get(format!("{}/api/v1/devices", admin.base))
        .await
        .expect("get");
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|h| h.to_str().ok()),
        Some("Bearer")
    );
    assert_eq!(forged.get("/api/v1/devices").await.0, 401);
    assert_eq!(anonymous.get("/healthz").await.0, 200);
    assert_eq!(anonymous.get("/metrics").await.0, 200);
    let (s, _) = anonymous
        .post("/api/v1/devices/pi/apps", &json!({"app": "audited"}))
        .await;
    assert_eq!(s, 401);

    // Viewer reads, but deploying needs operator.
    assert_eq!(viewer.get("/api/v1/devices").await.0, 200);
    let (s, v) = viewer
        .post("/api/v1/devices/pi/apps", &json!({"app": "audited"}))
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("operator"),
        "{v}"
    );
    // Operator deploys (to a device that exists only once it connects: the
    // role check passes and the request is stored), but defines no apps and
    // reads no audit log.
    let (s, v) = operator
        .post("/api/v1/devices/pi/apps", &json!({"app": "audited"}))
        .await;
    assert!(s == 202 || s == 404, "operator deploy: {s} {v}");
    let (s, _) = operator
        .post(
            "/api/v1/apps",
            &json!({"name": "nope", "containers": [{"name": "m", "image": image}]}),
        )
        .await;
    assert_eq!(s, 403);
    assert_eq!(operator.get("/api/v1/audit").await.0, 403);
    assert_eq!(
        operator
            .post("/api/v1/enrollment-tokens", &json!({}))
            .await
            .0,
        201
    );
    // Bad role names are a 400 naming the field.
    let (s, v) = admin
        .post("/api/v1/tokens", &json!({"name": "x", "role": "root"}))
        .await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("role")),
        "{v}"
    );

    // The audit log records who tried what and how it ended.
    let (s, log) = admin.get("/api/v1/audit?limit=100").await;
    assert_eq!(s, 200);
    let entries = log.as_array().expect("audit list");
    let has = |actor: &str, action: &str, outcome: &str, status: u16| {
        entries.iter().any(|e| {
            e["actor"] == json!(actor)
                && e["action"] == json!(action)
                && e["outcome"] == json!(outcome)
                && e["status"] == json!(status)
        })
    };
    assert!(
        has("anonymous", "POST /api/v1/devices/pi/apps", "denied", 401),
        "{log}"
    );
    assert!(
        has("watcher", "POST /api/v1/devices/pi/apps", "denied", 403),
        "{log}"
    );
    assert!(has("deployer", "POST /api/v1/apps", "denied", 403), "{log}");
    assert!(has("admin", "POST /api/v1/apps", "ok", 201), "{log}");
    assert!(entries.iter().all(|e| e["at_ms"].as_u64().unwrap_or(0) > 0));
    let (_, denied) = admin.get("/api/v1/audit?outcome=denied").await;
    assert!(denied
        .as_array()
        .expect("list")
        .iter()
        .all(|e| e["outcome"] == json!("denied")));
    assert_eq!(admin.get("/api/v1/audit?outcome=maybe").await.0, 400);

    // The CLI says why.
    let (ok, _, err) = drover_cli(&viewer, &["deploy", "audited", "-d", "pi"], b"").await;
    assert!(!ok);
    assert!(err.contains("needs the operator role"), "{err}");
    let (ok, _, err) = drover_cli(&anonymous, &["devices"], b"").await;
    assert!(!ok && err.contains("API token"), "{err}");

    // Tokens are shown once; listing shows no secret; a revoked token stops
    // working; the last admin token cannot be revoked.
    let (_, tokens) = admin.get("/api/v1/tokens").await;
    let text = tokens.to_string();
    assert!(!text.contains(viewer.token.as_deref().unwrap_or("?")));
    assert!(!text.contains("digest"), "{text}");
    let viewer_id = tokens
        .as_array()
        .expect("list")
        .iter()
        .find(|t| t["name"] == json!("watcher"))
        .expect("listed")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        admin.delete(&format!("/api/v1/tokens/{viewer_id}")).await.0,
        204
    );
    assert_eq!(viewer.get("/api/v1/devices").await.0, 401);
    let admin_id = tokens
        .as_array()
        .expect("list")
        .iter()
        .find(|t| t["role"] == json!("admin"))
        .expect("admin listed")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        admin.delete(&format!("/api/v1/tokens/{admin_id}")).await.0,
        409
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automation_identities_read_reports_but_never_commands() {
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("sec-auto"));
    online(&orch.api, &agent.id).await;
    let (ok, out, err) = drover_cli(
        &orch.api,
        &["-o", "json", "mqtt-users", "create", "nodered"],
        b"",
    )
    .await;
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).expect("json");
    let user = created["username"].as_str().expect("username").to_string();
    let pass = created["password"].as_str().expect("password").to_string();
    let login = Login {
        user: &user,
        pass: &pass,
        client_id: "nodered-1",
    };
    let topics = Topics::default();
    let (code, got) = subscribe_as(
        orch.mqtt_port,
        &login,
        &topics.all_devices(TopicKind::Heartbeat),
        10,
    )
    .await;
    assert_eq!(code, 0, "reading heartbeats");
    assert!(got.contains(&agent.id), "{got}");
    for filter in [
        topics.all_devices(TopicKind::Cmd),
        topics.all_devices(TopicKind::Desired),
        topics.everything(),
    ] {
        let (code, got) = subscribe_as(orch.mqtt_port, &login, &filter, 3).await;
        assert!(
            code != 0 && got.is_empty(),
            "automation read {filter}: {got}"
        );
    }
    let (code, _) = publish_as(
        orch.mqtt_port,
        Some(&login),
        &topics.device(
            &DeviceId::new(agent.id.clone()).expect("id"),
            TopicKind::Status,
        ),
        &encode(&Status {
            online: false,
            at_ms: 1,
        }),
    )
    .await;
    assert_ne!(code, 0, "automation posing as a device");
    // Deleting the identity locks it out.
    assert_eq!(orch.api.delete("/api/v1/mqtt-users/nodered").await.0, 204);
    let (code, _) = subscribe_as(
        orch.mqtt_port,
        &login,
        &topics.all_devices(TopicKind::Heartbeat),
        3,
    )
    .await;
    assert_ne!(code, 0);
    // Publishing into device topics cannot even be granted.
    let (s, v) = orch
        .api
        .post(
            "/api/v1/mqtt-users",
            &json!({"name": "evil", "publish": ["drover/#"]}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("publish[0]")),
        "{v}"
    );
    online(&orch.api, &agent.id).await;
    orch.stop().await;
}
