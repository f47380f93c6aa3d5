//! Agent self-update: agent releases (upload, list, delete, their checks),
//! binaries served over MQTT in chunks to the device that asks, and real
//! `drover-agent` processes that replace themselves through a rollout,
//! and go back when the new binary fails.

use std::time::Duration;

use drover_shared::topic::{TopicKind, Topics};
use drover_shared::update::{hex, BlobChunk, FetchRequest, MAX_CHUNK_BYTES};
use drover_shared::DeviceId;
use drover_tests::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn agent_bytes() -> Vec<u8> {
    std::fs::read(binary("drover-agent")).expect("read the test agent binary")
}

/// The test agent binary with bytes appended: the same program (an ELF
/// file ignores what follows its sections) under another digest.
fn variant(marker: &str) -> Vec<u8> {
    let mut b = agent_bytes();
    b.extend_from_slice(format!("\ndrover test variant {marker}\n").as_bytes());
    b
}

fn sha(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

async fn upload(api: &Api, version: &str, bin: Vec<u8>) -> (u16, Value) {
    api.post_bytes(&format!("/api/v1/agent-releases?version={version}"), bin)
        .await
}

/// An MQTT client standing in for device `id` on an open broker: asks
/// for chunks on its `fetch` topic, reads the answers on its `blob` topic.
struct Fetcher {
    client: rumqttc::AsyncClient,
    rx: tokio::sync::mpsc::Receiver<BlobChunk>,
    topics: Topics,
    id: DeviceId,
}

impl Fetcher {
    async fn connect(orch: &Orch, id: &str) -> Fetcher {
        let topics = Topics::default();
        let id = DeviceId::new(id).expect("id");
        let mut opts =
            rumqttc::MqttOptions::new(unique("fetcher"), &orch.mqtt_host, orch.mqtt_port);
        opts.set_max_packet_size(512 * 1024, 512 * 1024);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, rx) = tokio::sync::mpsc::channel(100);
        let blob = topics.device(&id, TopicKind::Blob);
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(t) = subscribed_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if p.topic == blob {
                            let c = drover_shared::decode::<BlobChunk>(&p.payload).expect("blob");
                            if tx.send(c).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        client
            .subscribe(
                topics.device(&id, TopicKind::Blob),
                rumqttc::QoS::AtLeastOnce,
            )
            .await
            .expect("subscribe");
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("suback in time")
            .expect("suback");
        Fetcher {
            client,
            rx,
            topics,
            id,
        }
    }

    async fn fetch(&mut self, digest: &str, offset: u64, len: u64) -> BlobChunk {
        let req = FetchRequest {
            digest: digest.to_string(),
            offset,
            len,
        };
        self.client
            .publish(
                self.topics.device(&self.id, TopicKind::Fetch),
                rumqttc::QoS::AtLeastOnce,
                false,
                drover_shared::encode(&req),
            )
            .await
            .expect("publish fetch");
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("an answer within 10 s")
            .expect("answer")
    }
}

#[tokio::test]
async fn agent_releases_are_checked_stored_and_served_in_chunks() {
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let bin = variant("serve");
    let digest = sha(&bin);

    // What is not an agent binary is refused, naming the field.
    for (version, body, field) in [
        ("1.0", b"#!/bin/sh\nexit 0\n".to_vec(), "body"),
        ("1.0", Vec::new(), "body"),
        ("", bin.clone(), "version"),
        ("a%2Fb", bin.clone(), "version"),
    ] {
        let (s, v) = upload(api, version, body).await;
        assert_eq!(s, 400, "{version:?}: {v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
    let (s, v) = api.post_bytes("/api/v1/agent-releases", bin.clone()).await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("version")),
        "{v}"
    );
    let (s, v) = upload(api, "big", vec![0x7f; 64 * 1024 * 1024 + 1]).await;
    assert_eq!(s, 413, "{v}");
    // Only admins upload; viewers list.
    let operator = api.as_role("ops", "operator").await;
    let (s, _) = upload(&operator, "2.0.0", bin.clone()).await;
    assert_eq!(s, 403);

    let (s, v) = upload(api, "2.0.0", bin.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["digest"], digest);
    assert_eq!(v["arch"], std::env::consts::ARCH);
    assert_eq!(v["size"], bin.len() as u64);
    assert_eq!(v["release"], 1);
    let stored = orch.data.path().join("agent-binaries").join(&digest);
    assert_eq!(std::fs::read(&stored).expect("stored file"), bin);
    let (s, v) = upload(api, "2.0.1", bin.clone()).await;
    assert_eq!(s, 409, "the same binary again: {v}");
    let (s, v) = upload(api, "2.0.0", variant("other")).await;
    assert_eq!(s, 409, "a second x86_64 binary for one version: {v}");
    let viewer = api.as_role("look", "viewer").await;
    let (s, v) = viewer.get("/api/v1/agent-releases").await;
    assert_eq!(s, 200);
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");

    // The device fetches the whole binary chunk by chunk.
    let mut f = Fetcher::connect(&orch, "fetcher").await;
    let mut got = Vec::new();
    while (got.len() as u64) < bin.len() as u64 {
        let c = f.fetch(&digest, got.len() as u64, u64::MAX).await;
        assert_eq!(c.error, None);
        assert_eq!((c.offset, c.total), (got.len() as u64, bin.len() as u64));
        assert!(!c.data.is_empty() && c.data.len() as u64 <= MAX_CHUNK_BYTES);
        got.extend_from_slice(&c.data);
    }
    assert_eq!(sha(&got), digest);

    // Hostile fetches are answered with an error, never a panic or a path.
    let c = f.fetch(&digest, bin.len() as u64, 10).await;
    assert!(
        c.error
            .as_deref()
            .is_some_and(|e| e.contains("past the end")),
        "{c:?}"
    );
    let c = f.fetch(&"0".repeat(64), 0, 10).await;
    assert!(
        c.error
            .as_deref()
            .is_some_and(|e| e.contains("no agent release")),
        "{c:?}"
    );
    for bad in ["../../drover.redb", "ABC", &digest.to_uppercase()] {
        let c = f.fetch(bad, 0, 10).await;
        assert!(
            c.error.as_deref().is_some_and(|e| e.starts_with("digest")),
            "{bad}: {c:?}"
        );
        assert!(c.data.is_empty());
    }

    // Devices that cannot take the version are refused by name: one of
    // another architecture, one that cannot replace its binary.
    for (id, arch, self_update, why) in [
        ("armdev", "aarch64", true, "armdev (aarch64)"),
        ("olddev", std::env::consts::ARCH, false, "olddev"),
    ] {
        let hello = drover_shared::payload::Hello {
            arch: arch.into(),
            self_update,
            labels: [("kind".to_string(), id.to_string())].into(),
            ..Default::default()
        };
        let topics = Topics::default();
        let dev = DeviceId::new(id).expect("id");
        f.client
            .publish(
                topics.device(&dev, TopicKind::Hello),
                rumqttc::QoS::AtLeastOnce,
                false,
                drover_shared::encode(&hello),
            )
            .await
            .expect("hello");
        wait_for(TIMEOUT, "the device to appear", || async {
            api.device(id)
                .await
                .filter(|d| d["inventory"]["arch"] == arch)
        })
        .await;
        let (s, v) = api
            .post(
                "/api/v1/rollouts",
                &serde_json::json!({"agent_version": "2.0.0", "selector": format!("kind={id}")}),
            )
            .await;
        assert_eq!(s, 409, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(why)),
            "{v}"
        );
    }

    // Deleting removes the record and the file; then nothing is served.
    let (s, v) = api.delete("/api/v1/agent-releases/nothex").await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("digest")),
        "{v}"
    );
    let (s, _) = api
        .delete(&format!("/api/v1/agent-releases/{digest}"))
        .await;
    assert_eq!(s, 204);
    assert!(!stored.exists());
    let (s, _) = api
        .delete(&format!("/api/v1/agent-releases/{digest}"))
        .await;
    assert_eq!(s, 404);
    let c = f.fetch(&digest, 0, 10).await;
    assert!(c.error.is_some(), "{c:?}");
    // The CLI: upload, list, delete.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("drover-agent");
    let cli_bin = variant("cli");
    std::fs::write(&file, &cli_bin).expect("write");
    let path = file.to_str().expect("utf-8 path");
    let (ok, out, err) = drover_cli(
        api,
        &["agent-releases", "upload", path, "--version", "5.0"],
        b"",
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&sha(&cli_bin)) && out.contains("5.0"), "{out}");
    let (ok, out, err) = drover_cli(api, &["agent-releases"], b"").await;
    assert!(
        ok && out.contains("VERSION") && out.contains("5.0"),
        "{out}{err}"
    );
    let (ok, out, err) = drover_cli(
        api,
        &["agent-releases", "upload", path, "--version", "5.1"],
        b"",
    )
    .await;
    assert!(!ok && err.contains("already uploaded"), "{out}{err}");
    let (ok, out, err) = drover_cli(api, &["agent-releases", "delete", &sha(&cli_bin)], b"").await;
    assert!(ok, "{out}{err}");

    // Every change is in the audit log.
    let (_, audit) = api.get("/api/v1/audit?limit=50").await;
    let text = audit.to_string();
    for name in ["agent_release.upload", "agent_release.delete"] {
        assert!(text.contains(name), "{name} not audited: {text}");
    }
    orch.stop().await;
}

const TIMEOUT: Duration = Duration::from_secs(120);

async fn device(api: &Api, id: &str) -> Value {
    api.device(id).await.unwrap_or(Value::Null)
}

/// Waits until `id` is online running the agent binary with `digest`.
async fn wait_running(api: &Api, id: &str, digest: &str) -> Value {
    wait_for(
        TIMEOUT,
        &format!("{id} online running {digest}"),
        || async {
            let d = device(api, id).await;
            (d["online"] == true && d["inventory"]["agent_digest"] == digest).then_some(d)
        },
    )
    .await
}

async fn wait_phase(api: &Api, id: &str, phases: &[&str]) -> Value {
    wait_for(
        TIMEOUT,
        &format!("rollout {id} to be {phases:?}"),
        || async {
            let (_, v) = api.get(&format!("/api/v1/rollouts/{id}")).await;
            phases.iter().any(|p| v["phase"] == *p).then_some(v)
        },
    )
    .await
}

/// Two agents with an app each, on an orchestrator with authentication.
async fn fleet(orch: &Orch, label: &str, extra: &[&str]) -> (Vec<Agent>, String, Vec<String>) {
    let api = &orch.api;
    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let app = unique("au");
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &serde_json::json!({"name": app, "containers": [{"name": "main", "image": image,
                "command": ["sh", "-c", "exec sleep 3600"]}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let mut args = vec!["--label".to_string(), format!("upd={label}")];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agents: Vec<Agent> = (0..2)
        .map(|i| Agent::spawn_with(&orch.broker_url(), &unique(&format!("au{i}")), &args))
        .collect();
    let packaged = sha(&agent_bytes());
    let docker = docker().await;
    let mut containers = Vec::new();
    for a in &agents {
        let d = wait_running(api, &a.id, &packaged).await;
        assert_eq!(d["inventory"]["self_update"], true, "{d}");
        let (s, op) = api
            .post(
                &format!("/api/v1/devices/{}/apps", a.id),
                &serde_json::json!({"app": app}),
            )
            .await;
        assert_eq!(s, 202, "{op}");
        let op = api.wait_op(&op, TIMEOUT).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let c = docker
            .inspect_container(&a.container_name(&app, "main"), None)
            .await
            .expect("container");
        containers.push(c.id.unwrap_or_default());
    }
    (agents, app, containers)
}

async fn container_ids(agents: &[Agent], app: &str) -> Vec<String> {
    let docker = docker().await;
    let mut out = Vec::new();
    for a in agents {
        let c = docker
            .inspect_container(&a.container_name(app, "main"), None)
            .await
            .expect("container");
        assert_eq!(c.state.and_then(|s| s.running), Some(true));
        out.push(c.id.unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_update_themselves_through_a_rollout_and_keep_their_apps() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let label = unique("l");
    let (agents, app, before) = fleet(&orch, &label, &[]).await;
    let v2 = variant("v2");
    let (s, v) = upload(api, "2.0.0", v2.clone()).await;
    assert_eq!(s, 201, "{v}");
    let new = sha(&v2);

    // Not both an app and an agent version; not an unknown version.
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"app": app, "agent_version": "2.0.0"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("agent_version")),
        "{v}"
    );
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"agent_version": "9.9"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("agent_version")),
        "{v}"
    );

    // A canary that waits for approval, then rolled back: it goes back
    // to the packaged binary (release 0), confirmed like any update.
    let selector = format!("upd={label}");
    let (s, r) = api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"agent_version": "2.0.0", "selector": selector,
                "batches": [1], "approval": true}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    wait_phase(api, &id, &["waiting_approval"]).await;
    let (_, devs) = api
        .get(&format!("/api/v1/rollouts/{id}/devices?state=updated"))
        .await;
    let canary = devs[0]["device"].as_str().expect("the canary").to_string();
    wait_running(api, &canary, &new).await;
    let (s, v) = api
        .post(
            &format!("/api/v1/rollouts/{id}/rollback"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_phase(api, &id, &["rolled_back"]).await;
    let packaged = sha(&agent_bytes());
    for a in &agents {
        wait_running(api, &a.id, &packaged).await;
    }
    let (_, events) = api.get(&format!("/api/v1/devices/{canary}/events")).await;
    assert!(
        events.to_string().matches("agent_updated").count() >= 2,
        "updated, then back to the package: {events}"
    );

    let (s, r) = api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"agent_version": "2.0.0", "selector": selector,
                "batches": [1], "device_timeout_secs": 90}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    assert_eq!(r["agent_version"], "2.0.0");
    assert_eq!(
        r["batches"].as_array().map(Vec::len),
        Some(2),
        "a canary batch: {r}"
    );
    let id = r["id"].as_str().expect("id").to_string();
    let done = wait_phase(api, &id, &["succeeded", "failed", "rolled_back"]).await;
    assert_eq!(done["phase"], "succeeded", "{done}");
    for a in &agents {
        let d = wait_running(api, &a.id, &new).await;
        assert!(d["desired"]["agent"]["digest"] == new.as_str(), "{d}");
    }
    // The agents were replaced; their apps were not.
    assert_eq!(container_ids(&agents, &app).await, before);
    // The binary in use cannot be deleted.
    let (s, v) = api.delete(&format!("/api/v1/agent-releases/{new}")).await;
    assert_eq!(s, 409, "{v}");
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_does_not_run_is_refused_and_the_rollout_rolls_back() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let label = unique("l");
    let (agents, app, before) = fleet(&orch, &label, &[]).await;
    let packaged = sha(&agent_bytes());
    // A real ELF executable of this machine whose `--version` fails.
    let bad = std::fs::read("/bin/false").expect("/bin/false");
    let (s, v) = upload(api, "3.0.0-bad", bad.clone()).await;
    assert_eq!(s, 201, "{v}");
    let (s, r) = api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"agent_version": "3.0.0-bad", "selector": format!("upd={label}"),
                "batches": [1]}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let done = wait_phase(api, &id, &["succeeded", "failed", "rolled_back"]).await;
    assert_eq!(done["phase"], "rolled_back", "{done}");
    let (_, devs) = api
        .get(&format!("/api/v1/rollouts/{id}/devices?state=rolled_back"))
        .await;
    assert!(
        devs.to_string().contains("version"),
        "the reason is shown: {devs}"
    );
    for a in &agents {
        let d = wait_running(api, &a.id, &packaged).await;
        assert!(d["desired"]["agent"].is_null(), "{d}");
    }
    assert_eq!(container_ids(&agents, &app).await, before);
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_never_comes_online_is_rolled_back() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let label = unique("l");
    let (mut agents, _app, _) = fleet(&orch, &label, &["--update-confirm-secs", "10"]).await;
    let packaged = sha(&agent_bytes());
    // `/bin/true` answers `--version` with success, then, run as the agent,
    // exits at once without ever connecting: what a broken build would do.
    // The test restarts an agent that exited, as systemd does.
    let never = std::fs::read("/bin/true").expect("/bin/true");
    let (s, v) = upload(api, "4.0.0-never", never).await;
    assert_eq!(s, 201, "{v}");
    let (s, r) = api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"agent_version": "4.0.0-never", "selector": format!("upd={label}"),
                "batches": [1], "device_timeout_secs": 60}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_string();
    let url = orch.broker_url();
    let done = wait_for(TIMEOUT, "the rollout to end", || {
        for a in agents.iter_mut() {
            if !a.running() {
                a.start(&url);
            }
        }
        async {
            let (_, v) = api.get(&format!("/api/v1/rollouts/{id}")).await;
            ["succeeded", "failed", "rolled_back"]
                .iter()
                .any(|p| v["phase"] == *p)
                .then_some(v)
        }
    })
    .await;
    assert_eq!(done["phase"], "rolled_back", "{done}");
    for a in agents.iter_mut() {
        if !a.running() {
            a.start(&url);
        }
        wait_running(api, &a.id, &packaged).await;
    }
    // The canary says why it went back.
    let (_, devs) = api.get(&format!("/api/v1/rollouts/{id}/devices")).await;
    assert!(devs.to_string().contains("online"), "{devs}");
    orch.stop().await;
}
