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
    publish_with(port, login, topic, payload, &["-q", "1"]).await
}

/// mosquitto_pub with these extra flags (QoS, retain, protocol version…).
async fn publish_with(
    port: u16,
    login: Option<&Login<'_>>,
    topic: &str,
    payload: &[u8],
    flags: &[&str],
) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payload");
    std::fs::write(&file, payload).expect("payload");
    let mut cmd = tokio::process::Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(flags)
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
    subscribe_with(port, login, filter, secs, &[]).await
}

/// [`subscribe_as`] with extra flags (a Last Will, `-c`…).
async fn subscribe_with(
    port: u16,
    login: &Login<'_>,
    filter: &str,
    secs: u32,
    flags: &[&str],
) -> (i32, String) {
    let out = tokio::process::Command::new("mosquitto_sub")
        .args(mosquitto_sub_args(port, login, filter))
        .args(["-C", "1", "-W", &secs.to_string(), "-F", "%t"])
        .args(flags)
        .output()
        .await
        .expect("mosquitto_sub is not installed; run `bash scripts/test-env.sh`");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn mosquitto_sub_args(port: u16, login: &Login<'_>, filter: &str) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        filter,
        "-u",
        login.user,
        "-P",
        login.pass,
        "-i",
        login.client_id,
    ]
    .map(str::to_string)
    .to_vec()
}

/// A mosquitto_sub left running, printing `<topic> <payload as hex>` per
/// message; [`Watcher::lines_until`] reads what it got.
struct Watcher {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<String>,
}

impl Watcher {
    fn start(port: u16, login: &Login<'_>, filters: &[String], extra: &[&str]) -> Watcher {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new("mosquitto_sub");
        cmd.args(mosquitto_sub_args(port, login, &filters[0]));
        for f in &filters[1..] {
            cmd.args(["-t", f]);
        }
        let mut child = cmd
            .args(["-F", "%t %x"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub is not installed; run `bash scripts/test-env.sh`");
        let out = child.stdout.take().expect("stdout");
        Watcher {
            child,
            lines: tokio::io::BufReader::new(out).lines(),
            seen: Vec::new(),
        }
    }

    /// Reads messages until one satisfies `done`; panics after `timeout`.
    /// Returns everything seen so far.
    async fn lines_until(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> &[String] {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("never saw {what}; saw {:?}", self.seen))
                .expect("mosquitto_sub output")
                .unwrap_or_else(|| {
                    panic!("mosquitto_sub ended before {what}; saw {:?}", self.seen)
                });
            let hit = done(&line);
            self.seen.push(line);
            if hit {
                return &self.seen;
            }
        }
    }

    async fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill().await;
        self.seen
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    // Everything B reports, as an automation client sees it: a forged
    // report that got through would show up here (a refused QoS 0 publish
    // looks sent to its publisher, so only a reader can tell).
    let (s, watch) = orch
        .api
        .post("/api/v1/mqtt-users", &json!({"name": "watch"}))
        .await;
    assert_eq!(s, 201, "{watch}");
    let watch_pass = watch["password"].as_str().expect("password").to_string();
    let watch_login = Login {
        user: watch["username"].as_str().expect("username"),
        pass: &watch_pass,
        client_id: "sec-watch",
    };
    let mut watcher = Watcher::start(
        orch.mqtt_port,
        &watch_login,
        &[
            topics.device(&b_id, TopicKind::Status),
            topics.device(&b_id, TopicKind::Telemetry),
            topics.device(&b_id, TopicKind::State),
        ],
        &[],
    );
    // Subscribed once B's retained status arrives.
    let b_status = topics.device(&b_id, TopicKind::Status);
    watcher
        .lines_until(Duration::from_secs(10), "B's retained status", |l| {
            l.starts_with(&format!("{b_status} "))
        })
        .await;
    let violations = metric(&orch.api, "drover_broker_acl_violations_total").await;
    let refused = metric(&orch.api, "drover_broker_subscriptions_refused_total").await;

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
                agent: None,
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
                    agent: None,
                },
            }),
        ),
        (TopicKind::Status, forged_status.clone()),
        (TopicKind::Telemetry, forged_telemetry.clone()),
    ];
    for (kind, payload) in &attempts {
        let topic = topics.device(&b_id, *kind);
        let (code, err) = publish_as(orch.mqtt_port, Some(&as_a), &topic, payload).await;
        // QoS 1: the broker closes the connection instead of acknowledging.
        assert_ne!(code, 0, "publishing on B's {kind} as A was accepted: {err}");
        for flags in [&["-q", "2"][..], &["-q", "1", "-r"], &["-q", "0", "-r"]] {
            let (code, err) =
                publish_with(orch.mqtt_port, Some(&as_a), &topic, payload, flags).await;
            if flags[1] != "0" {
                assert_ne!(code, 0, "{flags:?} on B's {kind} as A was accepted: {err}");
            }
        }
        // MQTT 5 is not spoken here at all: refused at CONNECT, with a
        // reason the client can show.
        let (code, err) =
            publish_with(orch.mqtt_port, Some(&as_a), &topic, payload, &["-V", "5"]).await;
        assert_ne!(code, 0, "MQTT 5 publish on B's {kind} as A: {err}");
        assert!(err.contains("Unsupported Protocol Version"), "{err}");
    }
    for filter in [
        topics.device(&b_id, TopicKind::Cmd),
        topics.device(&b_id, TopicKind::Desired),
        topics.device(&b_id, TopicKind::Secrets),
        topics.device(&b_id, TopicKind::Telemetry),
        topics.all_devices(TopicKind::Cmd),
        topics.all_devices(TopicKind::Secrets),
        topics.everything(),
        format!("$share/g/{}", topics.device(&b_id, TopicKind::Cmd)),
        "+/+/+/+/+".to_string(),
        "$SYS/#".to_string(),
        "#".to_string(),
    ] {
        // mosquitto_sub is told no (SUBACK 0x80) and receives nothing…
        let (_, got) = subscribe_as(orch.mqtt_port, &as_a, &filter, 3).await;
        assert!(
            got.is_empty(),
            "A subscribed to {filter} and received {got:?}"
        );
        // …and the connection stays up (MQTT 3.1.1 §3.9.3).
        assert_eq!(
            raw::suback(
                orch.mqtt_port,
                as_a.client_id,
                as_a.user,
                as_a.pass,
                &filter
            )
            .await,
            Some(vec![0x80]),
            "subscribing to {filter} as A"
        );
    }
    // A Last Will is a publish made later on A's behalf: one on B's status
    // is refused at CONNECT.
    let (code, _) = subscribe_with(
        orch.mqtt_port,
        &as_a,
        &topics.device(&DeviceId::new(a.id.clone()).expect("id"), TopicKind::Cmd),
        3,
        &[
            "--will-topic",
            &b_status,
            "--will-payload",
            "forged",
            "--will-retain",
        ],
    )
    .await;
    assert_ne!(code, 0, "a Last Will on B's status was accepted");
    let after_violations = metric(&orch.api, "drover_broker_acl_violations_total").await;
    assert!(
        after_violations >= violations + 17,
        "each refused publish and Last Will is counted: {violations} -> {after_violations}"
    );
    let after_refused = metric(&orch.api, "drover_broker_subscriptions_refused_total").await;
    assert!(
        after_refused >= refused + 22,
        "each refused subscription is counted: {refused} -> {after_refused}"
    );

    // B is untouched. Its next report after the attacks has been through the
    // broker and the orchestrator after anything the attacks could have
    // sent, so by then a forged message would have shown.
    let attacks_done = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let now = wait_for(
        Duration::from_secs(30),
        "a telemetry report from B after the attacks",
        || async {
            orch.api.device(&b.id).await.filter(|d| {
                d["telemetry"]["at_ms"]
                    .as_u64()
                    .is_some_and(|t| t > attacks_done && t != 4_242_424_242)
            })
        },
    )
    .await;
    let seen = watcher.stop().await;
    for forged in [&forged_status, &forged_telemetry] {
        assert!(
            !seen.iter().any(|l| l.ends_with(&hex(forged))),
            "a forged report reached a subscriber: {seen:?}"
        );
    }
    assert!(
        !seen.iter().any(|l| l.ends_with(&hex(b"forged"))),
        "A's Last Will reached B's status: {seen:?}"
    );
    assert_eq!(now["online"], json!(true), "{now}");
    assert_eq!(now["desired_generation"], before["desired_generation"]);
    assert_eq!(now["applied_generation"], before["applied_generation"]);
    assert_eq!(now["desired"], before["desired"]);
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

    // An operator's enrollment token made for B cannot take B's identity
    // while B's credential is active: that takes an admin's revocation.
    let operator = orch.api.as_role("o", "operator").await;
    let pinned = operator.enroll_token(&b.id).await;
    let takeover = Login {
        user: "$enroll",
        pass: &pinned,
        client_id: &b.id,
    };
    let (code, err) = publish_as(orch.mqtt_port, Some(&takeover), topic, b"x").await;
    assert!(
        code != 0 && err.contains("not authorised"),
        "a pinned token for an active device: {err}"
    );
    online(&orch.api, &b.id).await;

    // A viewer or operator may not revoke; an admin may, and the device is
    // disconnected at once and stays out.
    let viewer = orch.api.as_role("v", "viewer").await;
    for weak in [&viewer, &operator] {
        let (s, _) = weak
            .post(&format!("/api/v1/devices/{}/revoke", b.id), &Value::Null)
            .await;
        assert_eq!(s, 403);
    }
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
    // Given to the agent, it is refused too: the agent keeps its stored
    // credential, keeps running and stays out.
    b.kill().await;
    b.start_with_token(&orch.broker_url(), token);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        b.running(),
        "a refused re-enrollment does not stop the agent"
    );
    assert_eq!(password_of(&b), pass);
    let d = orch.api.device(&b.id).await.expect("device");
    assert_eq!(d["online"], json!(false));
    assert_eq!(d["credential"], json!("revoked"));
    // A token made for it, given at a restart, re-enrolls it: the broker
    // refuses the stored credential and the agent enrolls with the token
    // (no need to delete the credential file).
    b.kill().await;
    let pinned = orch.api.enroll_token(&b.id).await;
    b.start_with_token(&orch.broker_url(), &pinned);
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
    // A token's name is its "who" in the audit log: one name, one token,
    // and none that reads like a request without a token.
    for (name, status) in [("watcher", 409), ("anonymous", 400), ("invalid-token", 400)] {
        let (s, v) = admin
            .post("/api/v1/tokens", &json!({"name": name, "role": "admin"}))
            .await;
        assert_eq!(
            (s, v["error"]["field"].clone()),
            (status, json!("name")),
            "{name}: {v}"
        );
    }
    // The scheme is case-insensitive; anything but a bearer token is not one.
    let token = viewer.token.clone().expect("viewer token");
    let http = reqwest::Client::new();
    for (header, status) in [
        (format!("bearer {token}"), 200),
        (format!("BEARER  {token} "), 200),
        (format!("Basic {token}"), 401),
        (token.clone(), 401),
        ("Bearer".to_string(), 401),
    ] {
        let got = http
            .get(format!("{}/api/v1/devices", admin.base))
            .header("authorization", &header)
            .send()
            .await
            .expect("get")
            .status()
            .as_u16();
        assert_eq!(got, status, "Authorization: {header:?}");
    }

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
    // What was done, beyond method and path: the app deployed, the role
    // granted, why a request was refused.
    let detail_of = |actor: &str, action: &str, outcome: &str| {
        entries
            .iter()
            .find(|e| {
                e["actor"] == json!(actor)
                    && e["action"] == json!(action)
                    && e["outcome"] == json!(outcome)
            })
            .and_then(|e| e["detail"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        detail_of("deployer", "POST /api/v1/devices/pi/apps", "failed").contains("not known"),
        "{log}"
    );
    assert!(
        detail_of("watcher", "POST /api/v1/devices/pi/apps", "denied")
            .contains("needs the operator role"),
        "{log}"
    );
    assert!(
        detail_of("admin", "POST /api/v1/tokens", "ok").contains("role operator"),
        "{log}"
    );
    assert_eq!(
        detail_of("admin", "POST /api/v1/apps", "ok"),
        "unprivileged",
        "{log}"
    );
    assert!(
        !log.to_string().contains(token.as_str()),
        "a token in the audit log"
    );
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
        let (_, got) = subscribe_as(orch.mqtt_port, &login, &filter, 3).await;
        assert!(got.is_empty(), "automation read {filter}: {got}");
        assert_eq!(
            raw::suback(
                orch.mqtt_port,
                login.client_id,
                login.user,
                login.pass,
                &filter
            )
            .await,
            Some(vec![0x80]),
            "automation subscribing to {filter}"
        );
    }
    // Not even when granted everything, and not through a shared
    // subscription (rumqttd strips `$share/<group>/` and subscribes to the
    // rest).
    let (s, all) = orch
        .api
        .post(
            "/api/v1/mqtt-users",
            &json!({"name": "everything", "subscribe": ["#"]}),
        )
        .await;
    assert_eq!(s, 201, "{all}");
    let all_pass = all["password"].as_str().expect("password").to_string();
    let all_login = Login {
        user: all["username"].as_str().expect("username"),
        pass: &all_pass,
        client_id: "everything-1",
    };
    for filter in [
        "#".to_string(),
        topics.all_devices(TopicKind::Secrets),
        format!("$share/g/{}", topics.all_devices(TopicKind::Secrets)),
        format!("$share/g/{}", topics.all_devices(TopicKind::Desired)),
        "$share/g/#".to_string(),
    ] {
        let (_, got) = subscribe_as(orch.mqtt_port, &all_login, &filter, 3).await;
        assert!(
            got.is_empty(),
            "automation granted '#' read {filter}: {got}"
        );
        assert_eq!(
            raw::suback(
                orch.mqtt_port,
                all_login.client_id,
                all_login.user,
                all_login.pass,
                &filter
            )
            .await,
            Some(vec![0x80]),
            "automation granted '#' subscribing to {filter}"
        );
    }
    let (code, got) = subscribe_as(
        orch.mqtt_port,
        &all_login,
        &format!("$share/g/{}", topics.all_devices(TopicKind::Heartbeat)),
        10,
    )
    .await;
    assert_eq!(code, 0, "a shared subscription to heartbeats");
    assert!(got.contains(&agent.id), "{got}");
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

/// MQTT 3.1.1 packets written by hand, for what no well-behaved client
/// sends (a second CONNECT on one connection).
mod raw {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn string(s: &str) -> Vec<u8> {
        let mut v = u16::try_from(s.len())
            .expect("short")
            .to_be_bytes()
            .to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn packet(header: u8, body: Vec<u8>) -> Vec<u8> {
        let mut out = vec![header];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
        out.extend(body);
        out
    }

    pub fn connect(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
        let mut body = string("MQTT");
        // Level 4, flags: username, password, clean session; keep-alive 30 s.
        body.extend([4, 0xc2, 0, 30]);
        body.extend(string(client_id));
        body.extend(string(user));
        body.extend(string(pass));
        packet(0x10, body)
    }

    pub fn subscribe(filter: &str) -> Vec<u8> {
        let mut body = vec![0, 1];
        body.extend(string(filter));
        body.push(1);
        packet(0x82, body)
    }

    /// Everything the broker sends until it closes the connection, or
    /// `None` if it keeps it open for `secs`.
    pub async fn until_closed(stream: &mut TcpStream, secs: u64) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(secs), read)
            .await
            .ok()
            .map(|()| got)
    }

    pub async fn send(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).await.expect("send");
    }

    /// Logs in, subscribes to `filter` and returns the SUBACK's return
    /// codes, or `None` if the broker closed the connection instead;
    /// checks the connection is still open afterwards (a PINGREQ is
    /// answered).
    pub async fn suback(
        port: u16,
        client_id: &str,
        user: &str,
        pass: &str,
        filter: &str,
    ) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        send(&mut s, &connect(client_id, user, pass)).await;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).await.expect("connack");
        assert_eq!(connack, [0x20, 2, 0, 0], "{user} logs in");
        send(&mut s, &subscribe(filter)).await;
        let read = async {
            let mut header = [0u8; 2];
            s.read_exact(&mut header).await.ok()?;
            let mut body = vec![0u8; usize::from(header[1])];
            s.read_exact(&mut body).await.ok()?;
            Some((header[0], body))
        };
        let (kind, body) = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("an answer to SUBSCRIBE")?;
        assert_eq!(kind, 0x90, "a SUBACK: {body:02x?}");
        assert_eq!(body[..2], [0, 1], "for packet id 1");
        send(&mut s, &[0xc0, 0]).await;
        let mut pong = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut pong))
            .await
            .expect("PINGRESP in time")
            .expect("the connection stays open after a refused subscription");
        assert_eq!(pong, [0xd0, 0]);
        Some(body[2..].to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_cannot_make_a_device_someone_else() {
    use tokio::io::AsyncReadExt;
    let orch = Orch::start().await;
    let mut a = Agent::spawn(&orch.broker_url(), &unique("sec-2nd"));
    let b = Agent::spawn(&orch.broker_url(), &unique("sec-2nd-b"));
    online(&orch.api, &a.id).await;
    online(&orch.api, &b.id).await;
    let pass = password_of(&a);
    // A's own agent would take its session back.
    a.kill().await;
    let violations = metric(&orch.api, "drover_broker_acl_violations_total").await;

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", orch.mqtt_port))
        .await
        .expect("connect");
    raw::send(&mut s, &raw::connect(&a.id, &a.id, &pass)).await;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.expect("connack");
    assert_eq!(connack, [0x20, 2, 0, 0], "A's own login is accepted");
    // Credentials are checked on the first CONNECT only: a second one that
    // names the orchestrator (or anyone) must not change who A is.
    raw::send(&mut s, &raw::connect(&a.id, "$orchestrator", "guess")).await;
    raw::send(&mut s, &raw::subscribe("#")).await;
    let got = raw::until_closed(&mut s, 10)
        .await
        .expect("the broker kept a client open after a second CONNECT");
    assert!(
        !got.iter().any(|&b| b >> 4 == 3 || b >> 4 == 9),
        "A got a SUBACK or PUBLISH after a second CONNECT: {got:02x?}"
    );
    assert!(metric(&orch.api, "drover_broker_acl_violations_total").await > violations);
    // The orchestrator's real session is untouched: B still reports.
    online(&orch.api, &b.id).await;
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automation_client_cannot_take_over_a_devices_session() {
    let orch = Orch::start().await;
    let mut b = Agent::spawn(&orch.broker_url(), &unique("sec-take"));
    online(&orch.api, &b.id).await;
    // B is gone, its persistent session (subscribed to its cmd, desired
    // and secrets) waits for it in the broker.
    b.kill().await;
    let (s, v) = orch
        .api
        .post("/api/v1/mqtt-users", &json!({"name": "thief"}))
        .await;
    assert_eq!(s, 201, "{v}");
    let pass = v["password"].as_str().expect("password").to_string();
    let thief = Login {
        user: v["username"].as_str().expect("username"),
        pass: &pass,
        // B's client id, with a persistent session.
        client_id: &b.id,
    };
    let topics = Topics::default();
    let b_id = DeviceId::new(b.id.clone()).expect("id");
    let b_status = topics.device(&b_id, TopicKind::Status);
    let mut watcher = Watcher::start(
        orch.mqtt_port,
        &thief,
        std::slice::from_ref(&b_status),
        &["-c"],
    );
    watcher
        .lines_until(Duration::from_secs(10), "B's retained status", |l| {
            l.starts_with(&format!("{b_status} "))
        })
        .await;
    // Something for B: a desired state and a command on its topics.
    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let app = unique("takeapp");
    orch.api.create_app(&app, &image).await;
    let (s, op) = orch
        .api
        .post(
            &format!("/api/v1/devices/{}/apps", b.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    // B comes back; its `online` status follows, to the thief's own
    // subscription, after the deploy went out.
    b.start(&orch.broker_url());
    let online_hex = hex(&encode(&Status {
        online: true,
        at_ms: 0,
    }))[..30]
        .to_string();
    let seen = watcher
        .lines_until(Duration::from_secs(30), "B online again", |l| {
            l.starts_with(&format!("{b_status} ")) && l.contains(&online_hex)
        })
        .await
        .to_vec();
    for kind in [TopicKind::Cmd, TopicKind::Desired, TopicKind::Secrets] {
        let t = topics.device(&b_id, kind);
        assert!(
            !seen.iter().any(|l| l.starts_with(&format!("{t} "))),
            "an automation client with B's client id read B's {kind}: {seen:?}"
        );
    }
    // B got its own session and its deploy, and the thief was not thrown
    // out by B's return (their sessions are apart).
    assert_eq!(
        orch.api.wait_op(&op, Duration::from_secs(120)).await["status"],
        json!("succeeded")
    );
    // The audit log says which app was deployed, not only where.
    let (_, log) = orch.api.get("/api/v1/audit?actor=admin&outcome=ok").await;
    let deploy = format!("POST /api/v1/devices/{}/apps", b.id);
    assert!(
        log.as_array()
            .expect("audit")
            .iter()
            .any(|e| e["action"] == json!(deploy)
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("app {app}")))),
        "{log}"
    );
    assert!(
        watcher.child.try_wait().expect("mosquitto_sub").is_none(),
        "the automation client was disconnected by B's reconnect"
    );
    drop(watcher);
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_local_agent_stays_out_after_a_restart() {
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("local");
    let state_dir = state.path().to_str().expect("utf-8 path").to_string();
    let mut orch = OrchProc::start_with(
        &[
            "--local-agent",
            "--agent-state-dir",
            &state_dir,
            "--agent-device-id",
            &id,
        ],
        None,
    )
    .await;
    online(&orch.api, &id).await;
    let (s, v) = orch
        .api
        .post(&format!("/api/v1/devices/{id}/revoke"), &Value::Null)
        .await;
    assert_eq!(s, 200, "{v}");
    // `serve --local-agent` issues its own agent a credential when it has
    // none: a restart must not undo the revocation that way.
    orch.kill().await;
    orch.restart().await;
    wait_for(
        Duration::from_secs(30),
        "the local agent's login refused",
        || async {
            (metric(&orch.api, "drover_broker_auth_failures_total").await > 0).then_some(())
        },
    )
    .await;
    let d = orch.api.device(&id).await.expect("device known");
    assert_eq!(d["credential"], json!("revoked"), "{d}");
    assert_eq!(d["online"], json!(false), "{d}");
}
