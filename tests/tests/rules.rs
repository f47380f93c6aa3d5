//! Rules that act, end to end: a real agent on the real Docker Engine, real
//! outside MQTT clients (mosquitto_pub/sub as automation identities) and a
//! real HTTP receiver on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drover_tests::*;
use serde_json::{json, Value};

const OP_TIMEOUT: Duration = Duration::from_secs(90);

async fn firings(api: &Api, rule: &str) -> Vec<Value> {
    let (s, v) = api.get(&format!("/api/v1/rules/{rule}/firings")).await;
    assert_eq!(s, 200, "{v}");
    v.as_array().expect("array").clone()
}

async fn create_rule(api: &Api, rule: Value) {
    let (s, v) = api.post("/api/v1/rules", &rule).await;
    assert_eq!(s, 201, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_by_hand_is_started_again_by_a_rule_that_also_publishes_json() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("rules"));
    wait_for(Duration::from_secs(30), "device online", || async {
        orch.api
            .device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let image = fresh_image(&unique("rules")).await;
    let app = unique("revive");
    // Restart policy `no`: the agent leaves an exited container alone, so
    // only the rule can bring it back.
    let (s, v) = orch
        .api
        .post(
            "/api/v1/apps",
            &json!({"name": app, "containers": [{"name": "main", "image": image, "restart": "no"}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let alerts = format!("{}/alerts", unique("site"));
    let rule = unique("revive");
    create_rule(
        &orch.api,
        json!({
            "name": rule,
            "trigger": {"type": "app_state", "app": app},
            "condition": "app.containers.exists(c, c.state != 'running')",
            "actions": [
                {"type": "start", "app": app},
                {"type": "publish", "topic": alerts, "payload": {"what": "revived"}}
            ],
            "cooldown_secs": 30
        }),
    )
    .await;
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
    let login = automation(&orch.api, std::slice::from_ref(&alerts), &[]).await;
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &orch.mqtt_port.to_string(),
            "-q",
            "1",
        ])
        .args([
            "-t",
            &alerts,
            "-u",
            &login.0,
            "-P",
            &login.1,
            "-i",
            &unique("sub"),
        ])
        .args(["-C", "1", "-W", "60"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub is not installed; run `bash scripts/test-env.sh`");
    // Let the subscription reach the broker before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let container = agent.container_name(&app, "main");
    docker_cli(&["kill", &container]).await;

    let fired = wait_for(Duration::from_secs(60), "the rule's firing", || async {
        firings(&orch.api, &rule).await.into_iter().next()
    })
    .await;
    assert_eq!(fired["outcome"], json!("ok"), "{fired}");
    assert_eq!(fired["device"], json!(agent.id));
    assert_eq!(fired["trigger"], json!("app_state"));
    assert_eq!(fired["actions"][0]["action"], json!("start"));
    assert_eq!(fired["actions"][1]["action"], json!("publish"));
    assert_ne!(
        fired["value"]["app"]["containers"][0]["state"],
        json!("running")
    );

    let out = sub.wait_with_output().await.expect("mosquitto_sub");
    let msg: Value = serde_json::from_slice(&out.stdout).expect("the message is JSON");
    assert_eq!(msg["what"], json!("revived"), "{msg}");
    assert_eq!(msg["firing"]["rule"], json!(rule), "{msg}");
    assert_eq!(msg["firing"]["device"], json!(agent.id), "{msg}");

    wait_for(
        Duration::from_secs(60),
        "the container running again",
        || async {
            let c = docker
                .inspect_container(
                    &container,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .ok()?;
            c.state.and_then(|s| s.running).filter(|r| *r)
        },
    )
    .await;
    // The start was the rule's command, audited as the rule.
    let (s, audit) = orch.api.get("/api/v1/audit?limit=200").await;
    assert_eq!(s, 200, "{audit}");
    let actor = format!("rule:{rule}");
    let rows = audit.as_array().expect("array");
    assert!(
        rows.iter()
            .any(|r| r["actor"] == json!(actor) && r["command"] == json!("start")),
        "{audit}"
    );
    assert!(
        rows.iter().any(|r| r["actor"] == json!(actor)
            && r["detail"].as_str().unwrap_or("").contains("start ok")),
        "{audit}"
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_threshold_rule_fires_after_its_duration_and_respects_its_cooldown() {
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("hot"));
    let rule = unique("hot");
    // Every sample holds (the agent sends one a second): the rule may fire
    // after 2 s, and then once per 3 s cooldown.
    create_rule(
        &orch.api,
        json!({
            "name": rule,
            "trigger": {"type": "telemetry", "for_secs": 2},
            "condition": "telemetry.host.cpu_percent >= 0.0 && device.id == '".to_string() + &agent.id + "'",
            "actions": [{"type": "publish", "topic": format!("{}/hot", unique("t"))}],
            "cooldown_secs": 3
        }),
    )
    .await;
    let first = wait_for(Duration::from_secs(30), "a first firing", || async {
        firings(&orch.api, &rule).await.into_iter().next()
    })
    .await;
    assert!(
        first["value"]["held_ms"].as_u64().expect("held_ms") >= 2000,
        "{first}"
    );
    // Read as it goes (an idle pooled connection may be closed by the
    // server's header timeout just as it is reused).
    let mut all = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        all = firings(&orch.api, &rule).await;
    }
    let mut at: Vec<u64> = all
        .iter()
        .map(|f| f["at_ms"].as_u64().expect("at_ms"))
        .collect();
    at.sort();
    // 10 s at one sample a second: ten samples held, but the cooldown
    // lets at most one firing in every 3 s through.
    assert!((3..=5).contains(&at.len()), "{at:?}");
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= 2_900,
            "fired {} ms apart: {at:?}",
            w[1] - w[0]
        );
    }
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_rule_reaches_a_local_receiver_and_retries_while_it_fails() {
    let orch = Orch::start().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let app = {
        let hits = hits.clone();
        let bodies = bodies.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let hits = hits.clone();
                let bodies = bodies.clone();
                async move {
                    // Down for the first two calls.
                    if hits.fetch_add(1, Ordering::SeqCst) < 2 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        bodies.lock().expect("lock").push(body);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let topic = format!("{}/door", unique("hook"));
    let rule = unique("hook");
    create_rule(
        &orch.api,
        json!({
            "name": rule,
            "trigger": {"type": "mqtt", "filter": topic},
            "condition": "message.json.open == true",
            "actions": [{"type": "webhook", "url": format!("http://{addr}/hook")}]
        }),
    )
    .await;
    let login = automation(&orch.api, &[], std::slice::from_ref(&topic)).await;
    // The rule's subscription is made on its creation; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_as(orch.mqtt_port, &login, &topic, r#"{"open": false}"#).await;
    publish_as(orch.mqtt_port, &login, &topic, r#"{"open": true}"#).await;
    let fired = wait_for(Duration::from_secs(60), "the webhook firing", || async {
        firings(&orch.api, &rule).await.into_iter().next()
    })
    .await;
    assert_eq!(fired["outcome"], json!("ok"), "{fired}");
    let detail = fired["actions"][0]["detail"].as_str().expect("detail");
    assert!(detail.contains("after 3 attempt(s)"), "{detail}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let got = bodies.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "only the matching message fires: {got:?}");
    assert_eq!(got[0]["rule"], json!(rule));
    assert_eq!(got[0]["value"]["message"]["json"]["open"], json!(true));
    assert_eq!(firings(&orch.api, &rule).await.len(), 1);
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_of_rules_is_cut_and_reported() {
    let orch = Orch::start().await;
    let base = unique("loop");
    let (a, b) = (format!("{base}/a"), format!("{base}/b"));
    let (ra, rb) = (unique("ping"), unique("pong"));
    create_rule(
        &orch.api,
        json!({"name": ra, "trigger": {"type": "mqtt", "filter": a},
               "actions": [{"type": "publish", "topic": b}]}),
    )
    .await;
    create_rule(
        &orch.api,
        json!({"name": rb, "trigger": {"type": "mqtt", "filter": b},
               "actions": [{"type": "publish", "topic": a}]}),
    )
    .await;
    let login = automation(&orch.api, &[], &[format!("{base}/#")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_as(orch.mqtt_port, &login, &a, "{}").await;
    let cut = wait_for(Duration::from_secs(30), "the loop cut", || async {
        firings(&orch.api, &ra)
            .await
            .into_iter()
            .find(|f| f["outcome"] == json!("cut"))
    })
    .await;
    assert_eq!(cut["chain"], json!([ra, rb]), "{cut}");
    assert!(cut["actions"].as_array().expect("actions").is_empty());
    assert!(
        cut["detail"]
            .as_str()
            .expect("detail")
            .contains("its own actions"),
        "{cut}"
    );
    // And it stays cut: nothing more fires.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(firings(&orch.api, &ra).await.len(), 2);
    assert_eq!(firings(&orch.api, &rb).await.len(), 1);
    let (s, text) = orch.api.get("/metrics").await;
    assert_eq!(s, 200);
    let text = text
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text.to_string());
    assert!(
        text.contains("drover_rule_firings_total{outcome=\"cut\"} 1"),
        "{text}"
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_are_refused_naming_the_field() {
    let orch = Orch::start().await;
    let ok = json!({"name": "r1", "trigger": {"type": "device_online"},
                    "actions": [{"type": "start", "app": "web"}]});
    let with = |k: &str, v: Value| {
        let mut r = ok.clone();
        r[k] = v;
        r
    };
    let cases = [
        (
            with("condition", json!("device.id ==")),
            "condition",
            "not a CEL expression",
        ),
        (
            with("condition", json!("telemetry.host.cpu_percent > 1.0")),
            "condition",
            "unknown variable `telemetry`",
        ),
        (with("condition", json!("1 + 1")), "condition", "boolean"),
        (
            with("trigger", json!({"type": "sunrise"})),
            "trigger",
            "unknown variant `sunrise`",
        ),
        (with("selector", json!("a in (b")), "selector", "not valid"),
        (
            with(
                "actions",
                json!([{"type": "webhook", "url": "file:///etc/passwd"}]),
            ),
            "actions[0].url",
            "http://",
        ),
        (
            with(
                "actions",
                json!([{"type": "publish", "topic": "drover/v1/dev/x/cmd"}]),
            ),
            "actions[0].topic",
            "drover/#",
        ),
        (
            with(
                "actions",
                json!([{"type": "publish", "topic": "a", "payload": {"big": "x".repeat(20_000)}}]),
            ),
            "",
            "at most 16384",
        ),
        (with("actions", json!([])), "actions", "1 to 8"),
        (
            with("cooldown_secs", json!("soon")),
            "cooldown_secs",
            "invalid type",
        ),
        (with("colour", json!("red")), "colour", "unknown field"),
    ];
    for (rule, field, words) in cases {
        let (s, v) = orch.api.post("/api/v1/rules", &rule).await;
        assert_eq!(s, 400, "{rule}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(words), "{rule}: {v}");
        if !field.is_empty() {
            assert!(
                v["error"]["field"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(field),
                "{rule}: {v}"
            );
        }
    }
    let (s, v) = orch.api.post_raw("/api/v1/rules", "[1]").await;
    assert_eq!(s, 400, "{v}");
    // A good one, then its name again, then an update that names another.
    create_rule(&orch.api, ok.clone()).await;
    let (s, v) = orch.api.post("/api/v1/rules", &ok).await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = orch
        .api
        .send_json(
            reqwest::Method::PUT,
            "/api/v1/rules/r1",
            &with("name", json!("r2")),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    // A viewer may read rules but not change them.
    let viewer = orch.api.as_role(&unique("viewer"), "viewer").await;
    assert_eq!(viewer.get("/api/v1/rules").await.0, 200);
    assert_eq!(
        viewer
            .post("/api/v1/rules", &with("name", json!("r3")))
            .await
            .0,
        403
    );
    assert_eq!(viewer.delete("/api/v1/rules/r1").await.0, 403);
    assert_eq!(orch.api.delete("/api/v1/rules/r1").await.0, 204);
    assert_eq!(orch.api.get("/api/v1/rules/r1").await.0, 404);

    // The CLI: create from stdin, disable, list, and a refusal it shows.
    let rule = serde_json::to_vec(&with("name", json!("cli-1"))).expect("json");
    let (ok, out, err) = drover_cli(&orch.api, &["rules", "create", "-f", "-"], &rule).await;
    assert!(ok, "{out} {err}");
    let (ok, out, err) = drover_cli(&orch.api, &["rules", "disable", "cli-1"], b"").await;
    assert!(ok && out.contains("rule cli-1 disabled"), "{out} {err}");
    assert_eq!(
        orch.api.get("/api/v1/rules/cli-1").await.1["enabled"],
        json!(false)
    );
    let (ok, out, err) = drover_cli(&orch.api, &["rules", "list"], b"").await;
    assert!(
        ok && out.contains("cli-1") && out.contains("device_online"),
        "{out} {err}"
    );
    let (ok, out, err) = drover_cli(&orch.api, &["rules", "firings"], b"").await;
    assert!(ok && out.contains("OUTCOME"), "{out} {err}");
    let bad = serde_json::to_vec(&with("selector", json!("a in (b"))).expect("json");
    let (ok, _, err) = drover_cli(&orch.api, &["rules", "create", "-f", "-"], &bad).await;
    assert!(!ok && err.contains("selector"), "{err}");
    orch.stop().await;
}
