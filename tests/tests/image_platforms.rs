//! The right image for each device: agents report their OCI platform, pull
//! for it, and the orchestrator refuses a deploy, an assignment or a
//! rollout whose image does not provide a target device's platform, over
//! every surface, before anything reaches a device.
//!
//! Multi-platform images are made by hand in the registry on
//! 127.0.0.1:5000: the test image's config re-described with another
//! architecture (its layers unchanged), one manifest per platform, and an
//! OCI image index over them, all PUT through the distribution API.

use std::time::Duration;

use drover_shared::payload::{Hello, Status};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{encode, DeviceId, Platform};
use drover_tests::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const OP_TIMEOUT: Duration = Duration::from_secs(90);

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

async fn get_json(http: &reqwest::Client, url: &str, accept: &str) -> (Value, String) {
    let resp =
        http.get(url).header("Accept", accept).send().await.expect(
            "the registry at 127.0.0.1:5000 is not reachable; run `bash scripts/test-env.sh`",
        );
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (resp.json().await.expect("JSON"), ctype)
}

/// Uploads a blob (monolithic: POST an upload, PUT it with its digest).
async fn put_blob(http: &reqwest::Client, repo: &str, body: Vec<u8>) -> String {
    let digest = sha256(&body);
    let resp = http
        .post(format!("http://{REGISTRY}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(resp.status().as_u16(), 202, "start upload");
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("upload location")
        .to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{REGISTRY}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = http
        .put(format!("{url}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("upload blob");
    assert_eq!(resp.status().as_u16(), 201, "upload blob");
    digest
}

async fn put_manifest(
    http: &reqwest::Client,
    repo: &str,
    reference: &str,
    media: &str,
    body: &[u8],
) {
    let resp = http
        .put(format!("http://{REGISTRY}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", media)
        .body(body.to_vec())
        .send()
        .await
        .expect("put manifest");
    assert!(
        resp.status().is_success(),
        "put manifest {reference}: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
}

/// Puts `drover/busybox:<tag>` as an OCI image index with one manifest per
/// platform: the test image's layers (amd64 binaries) under a config that
/// says that platform. Returns the reference and, per platform, the
/// digest of its config (the image id Docker shows after pulling it).
async fn push_index(tag: &str, platforms: &[&str]) -> (String, Vec<(String, String)>) {
    let http = reqwest::Client::new();
    let accept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";
    let (base, media) = get_json(
        &http,
        &format!("http://{REGISTRY}/v2/{BASE_REPO}/manifests/{BASE_TAG}"),
        accept,
    )
    .await;
    let media = media.split(';').next().unwrap_or_default().to_string();
    let config_digest = base["config"]["digest"].as_str().expect("config digest");
    let (config, _) = get_json(
        &http,
        &format!("http://{REGISTRY}/v2/{BASE_REPO}/blobs/{config_digest}"),
        "*/*",
    )
    .await;
    let mut entries = Vec::new();
    let mut ids = Vec::new();
    for p in platforms {
        let platform: Platform = p.parse().expect("platform");
        let mut c = config.clone();
        c["os"] = json!(platform.os);
        c["architecture"] = json!(platform.architecture);
        match &platform.variant {
            Some(v) => c["variant"] = json!(v),
            None => {
                if let Some(o) = c.as_object_mut() {
                    o.remove("variant");
                }
            }
        }
        // A label too, so two platforms never share a config digest.
        c["config"]["Labels"] = json!({"drover.test.platform": p});
        let bytes = serde_json::to_vec(&c).expect("config JSON");
        let size = bytes.len();
        let digest = put_blob(&http, BASE_REPO, bytes).await;
        let mut m = base.clone();
        m["config"]["digest"] = json!(digest);
        m["config"]["size"] = json!(size);
        let body = serde_json::to_vec(&m).expect("manifest JSON");
        let mdigest = sha256(&body);
        put_manifest(&http, BASE_REPO, &mdigest, &media, &body).await;
        let mut plat = json!({"os": platform.os, "architecture": platform.architecture});
        if let Some(v) = &platform.variant {
            plat["variant"] = json!(v);
        }
        entries.push(json!({
            "mediaType": media,
            "digest": mdigest,
            "size": body.len(),
            "platform": plat,
        }));
        ids.push((p.to_string(), digest));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    });
    let body = serde_json::to_vec(&index).expect("index JSON");
    put_manifest(
        &http,
        BASE_REPO,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &body,
    )
    .await;
    (format!("{REGISTRY}/{BASE_REPO}:{tag}"), ids)
}

async fn online(api: &Api, id: &str) -> Value {
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(id)
            .await
            .filter(|d| d["online"] == json!(true) && d["platform"].is_string())
    })
    .await
}

/// A device that is only a hello on its topics: it says it is `platform`
/// (or nothing, like an older agent) and carries `labels`.
async fn fake_device(
    orch: &Orch,
    id: &str,
    platform: Option<&str>,
    arch: &str,
    labels: &[(&str, &str)],
) {
    let topics = Topics::default();
    let dev = DeviceId::new(id).expect("id");
    let hello = Hello {
        hostname: id.into(),
        arch: arch.into(),
        platform: platform.map(|p| p.parse().expect("platform")),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        ..Hello::default()
    };
    mosquitto_pub(
        orch.mqtt_port,
        &topics.device(&dev, TopicKind::Hello),
        &encode(&hello),
        false,
    )
    .await;
    mosquitto_pub(
        orch.mqtt_port,
        &topics.device(&dev, TopicKind::Status),
        &encode(&Status {
            online: true,
            at_ms: 1,
        }),
        false,
    )
    .await;
    wait_for(Duration::from_secs(20), "fake device known", || async {
        orch.api.device(id).await.map(|_| ())
    })
    .await;
}

fn this_platform() -> String {
    Platform::of_this_build().expect("platform").to_string()
}

/// The deploy of an image that offers only another platform is refused on
/// REST and the CLI, naming both platforms, and nothing reaches the
/// device; an image offering both deploys, runs, and the agent pulled the
/// entry of its own platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_need_the_device_platform_and_pull_it() {
    let docker = docker().await;
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let agent = Agent::spawn(&orch.broker_url(), &unique("plat"));
    let here = this_platform();
    let other = if here == "linux/arm64" {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let view = online(api, &agent.id).await;
    assert_eq!(view["platform"], json!(here), "{view}");
    assert_eq!(
        view["inventory"]["platform"]["os"],
        json!("linux"),
        "{view}"
    );

    // Only the other platform: refused, by name, on every surface.
    let (only_other, _) = push_index(&unique("only"), &[other]).await;
    let app = unique("wrong");
    api.create_app(&app, &only_other).await;
    let (s, v) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains(other) && msg.contains(&here) && msg.contains(&agent.id),
        "the refusal names the image's platforms, the device and its platform: {v}"
    );
    assert_eq!(v["error"]["field"], json!("image"), "{v}");
    let (ok, out, err) = drover_cli(api, &["deploy", &app, "--device", &agent.id], b"").await;
    assert!(!ok, "the CLI deploy is refused too: {out}");
    assert!(err.contains(other) && err.contains(&here), "{err}");
    let (_, ops) = api
        .get(&format!("/api/v1/operations?device={}", agent.id))
        .await;
    assert_eq!(ops, json!([]), "no operation was made");
    let d = api.device(&agent.id).await.expect("device");
    assert_eq!(
        d["desired_generation"],
        json!(0),
        "nothing reached the device: {d}"
    );

    // Both platforms: deployed, running, and the pulled image is ours.
    let (both, ids) = push_index(&unique("both"), &[other, &here]).await;
    let app = unique("right");
    api.create_app(&app, &both).await;
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    let done = api.wait_op(&op, OP_TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    wait_for(OP_TIMEOUT, "container running", || async {
        device_containers(&docker, &agent.id)
            .await
            .iter()
            .any(|c| c.app == app && c.running)
            .then_some(())
    })
    .await;
    let inspected = docker.inspect_image(&both).await.expect("image pulled");
    let want = &ids.iter().find(|(p, _)| *p == here).expect("ours").1;
    assert_eq!(
        inspected.id.as_deref(),
        Some(want.as_str()),
        "the agent pulled the {here} entry"
    );
    assert_eq!(
        inspected.architecture.as_deref(),
        Some(here.trim_start_matches("linux/"))
    );
    drop(agent);
    untag(&both);
}

/// A rollout over a selector that matches a device the image does not
/// provide for is refused as a whole, naming that device; a device that
/// reports no platform (an older agent) is not held against the image,
/// and neither is an image the registry does not have (loaded on devices
/// by hand): those go ahead, and the audit record says what was not
/// checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_are_refused_naming_the_device_that_cannot_run_the_image() {
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let here = this_platform();
    let site = unique("site");
    let pi = unique("pi");
    fake_device(&orch, &pi, Some("linux/arm/v6"), "arm", &[("site", &site)]).await;
    let nuc = unique("nuc");
    fake_device(&orch, &nuc, Some(&here), "x86_64", &[("site", &site)]).await;
    let (image, _) = push_index(&unique("ro"), &[&here, "linux/arm/v7"]).await;
    let app = unique("ro");
    api.create_app(&app, &image).await;

    let selector = format!("site={site}");
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "selector": selector}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("device {pi} is linux/arm/v6"))
            && msg.contains("linux/arm/v7")
            && !msg.contains(&nuc),
        "{v}"
    );
    let (_, list) = api.get(&format!("/api/v1/rollouts?app={app}")).await;
    assert_eq!(list, json!([]), "no rollout was made");
    // The same for an assignment over the selector.
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/apps/{app}/assignment"),
            &json!({"selector": selector}),
        )
        .await;
    assert_eq!(s, 409, "{v}");

    // An older agent's device (no platform, 32-bit ARM) is not judged.
    let old = unique("old");
    let old_site = unique("site");
    fake_device(&orch, &old, None, "arm", &[("site", &old_site)]).await;
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "selector": format!("site={old_site}")}),
        )
        .await;
    assert_eq!(s, 201, "{v}");

    // An image only present on devices: not in its registry, so not
    // judged; the deploy goes ahead and the audit record says so.
    let handmade = unique("handmade");
    let app2 = unique("hm");
    api.create_app(&app2, &format!("{REGISTRY}/drover/{handmade}:1"))
        .await;
    let (s, v) = api
        .post(
            &format!("/api/v1/devices/{nuc}/apps"),
            &json!({"app": app2}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let (_, audit) = api.get("/api/v1/audit?limit=20").await;
    assert!(
        audit.to_string().contains("not checked"),
        "the audit record says the platforms were not checked: {audit}"
    );
}

/// An assignment keeps what the registry said of its image: a device that
/// joins it later (enrolls or is labelled into its selector) is given the
/// app only where the image provides its platform; the assignment shows
/// the others as unsupported. The engine never asks the registry for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_joining_an_assignment_later_get_only_images_they_can_run() {
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let here = this_platform();
    let other = if here == "linux/arm64" {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let (image, _) = push_index(&unique("late"), &[&here]).await;
    let app = unique("late");
    api.create_app(&app, &image).await;
    let site = unique("site");
    // No device matches yet: the assignment is made, and keeps the
    // platforms the registry gave.
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/apps/{app}/assignment"),
            &json!({"selector": format!("site={site}")}),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    let pi = unique("pi");
    fake_device(&orch, &pi, Some(other), "aarch64", &[("site", &site)]).await;
    let nuc = unique("nuc");
    fake_device(&orch, &nuc, Some(&here), "x86_64", &[("site", &site)]).await;
    let view = wait_for(
        Duration::from_secs(20),
        "the assignment placed nuc",
        || async {
            let (_, v) = api.get(&format!("/api/v1/apps/{app}/assignment")).await;
            (v["assigned"] == json!([nuc])).then_some(v)
        },
    )
    .await;
    assert_eq!(view["unsupported"], json!([pi]), "{view}");
    let mut matching: Vec<String> = serde_json::from_value(view["matching"].clone()).expect("ids");
    matching.sort();
    let mut both = vec![pi.clone(), nuc.clone()];
    both.sort();
    assert_eq!(matching, both, "{view}");
    let d = api.device(&pi).await.expect("pi");
    assert_eq!(
        d["desired_generation"],
        json!(0),
        "nothing was sent to the device the image cannot run on: {d}"
    );
    let d = api.device(&nuc).await.expect("nuc");
    assert_eq!(d["desired_generation"], json!(1), "{d}");

    // Relabelling a third device into the selector: the same rule.
    let late = unique("late");
    fake_device(&orch, &late, Some(other), "aarch64", &[]).await;
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/devices/{late}/labels"),
            &json!({"labels": {"site": site}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let view = wait_for(Duration::from_secs(20), "late is unsupported", || async {
        let (_, v) = api.get(&format!("/api/v1/apps/{app}/assignment")).await;
        v["unsupported"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
            .then_some(v)
    })
    .await;
    assert_eq!(view["assigned"], json!([nuc]), "{view}");
    let d = api.device(&late).await.expect("late");
    assert_eq!(d["desired_generation"], json!(0), "{d}");
}
