//! App specs are unprivileged by default, on the real Docker Engine: what
//! Docker reports for a default container, and for one that asks for
//! privileged mode and a host mount; and how the API and CLI show it.

use std::time::Duration;

use bollard::models::HostConfig;
use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use serde_json::{json, Value};

async fn host_config(docker: &bollard::Docker, name: &str) -> HostConfig {
    docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .expect("inspect container")
        .host_config
        .expect("host config")
}

/// Deploys and returns the final operation.
async fn deploy_op(api: &Api, device: &str, app: &str) -> Value {
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{device}/apps"),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    api.wait_op(&op, Duration::from_secs(60)).await
}

async fn deploy(api: &Api, device: &str, app: &str) {
    let done = deploy_op(api, device, app).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_apps_are_unprivileged_and_privileges_are_exactly_what_was_asked() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let agent = Agent::spawn(&orch.broker_url(), &unique("privs"));
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let image = fresh_image(&unique("privs")).await;

    // A host path in `volumes` is refused, pointing at host_mounts.
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &json!({"name": unique("bad"), "containers": [{"name": "main", "image": image,
                    "volumes": [{"source": "/etc", "target": "/host-etc"}]}]}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        v["error"]["field"],
        json!("containers[0].volumes[0].source")
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("host_mounts"),
        "{v}"
    );

    // Default: nothing asked, nothing given.
    let plain = unique("plain");
    api.create_app(&plain, &image).await;
    let (_, view) = api.get(&format!("/api/v1/apps/{plain}")).await;
    assert_eq!(view["privileges"], json!([]), "{view}");
    deploy(api, &agent.id, &plain).await;
    let hc = host_config(&docker, &agent.container_name(&plain, "main")).await;
    assert_eq!(hc.privileged, Some(false));
    assert_ne!(hc.network_mode.as_deref(), Some("host"));
    assert!(
        hc.security_opt
            .unwrap_or_default()
            .iter()
            .any(|o| o == "no-new-privileges:true" || o == "no-new-privileges"),
        "no-new-privileges is set"
    );
    assert!(hc.binds.unwrap_or_default().is_empty());
    assert!(hc.mounts.unwrap_or_default().is_empty());
    assert!(hc.cap_add.unwrap_or_default().is_empty());
    assert!(hc.devices.unwrap_or_default().is_empty());

    // Privileged with one host mount: exactly that.
    let host_dir = tempfile::tempdir().expect("tempdir");
    let source = host_dir.path().display().to_string();
    let tool = unique("tool");
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &json!({"name": tool, "containers": [{"name": "main", "image": image,
                    "privileged": true,
                    "host_mounts": [{"source": source, "target": "/data", "read_only": true}]}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let want = json!(["privileged", format!("host-mount:{source}")]);
    assert_eq!(v["privileges"], want, "{v}");
    let done = deploy_op(api, &agent.id, &tool).await;
    // A Docker daemon that itself runs without every capability (as in some
    // CI sandboxes) creates a privileged container but cannot start it. The
    // container Docker created is what this test is about.
    let detail = done["detail"].as_str().unwrap_or_default();
    assert!(
        done["status"] == json!("succeeded")
            || (done["status"] == json!("failed") && detail.contains("unable to apply caps")),
        "{done}"
    );
    let hc = host_config(&docker, &agent.container_name(&tool, "main")).await;
    assert_eq!(hc.privileged, Some(true));
    assert_eq!(hc.binds, Some(vec![format!("{source}:/data:ro")]));
    assert_ne!(hc.network_mode.as_deref(), Some("host"));
    assert!(hc.cap_add.unwrap_or_default().is_empty());
    assert!(hc.devices.unwrap_or_default().is_empty());

    // The API shows it per app, for the app and for the device.
    let (_, apps) = api.get("/api/v1/apps").await;
    let listed: Vec<&Value> = apps
        .as_array()
        .expect("array")
        .iter()
        .filter(|a| a["spec"]["name"] == json!(tool))
        .collect();
    assert_eq!(listed[0]["privileges"], want);
    let d = api.device(&agent.id).await.expect("device");
    assert_eq!(d["privileges"][&tool], want, "{d}");
    assert_eq!(d["privileges"][&plain], json!([]), "{d}");

    // And so does the CLI.
    let (ok, out, err) = drover_cli(api, &["apps", "show", &tool], b"").await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("privileges:  privileged, host-mount:{source}")),
        "{out}"
    );
    let (ok, out, err) = drover_cli(api, &["apps", "show", &plain], b"").await;
    assert!(ok, "{err}");
    assert!(out.contains("privileges:  none (unprivileged)"), "{out}");
    let (ok, out, err) = drover_cli(api, &["devices", "show", &agent.id], b"").await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "privileges:  {tool}: privileged, host-mount:{source}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("privileges:  {plain}: none (unprivileged)")),
        "{out}"
    );

    // Dropping the privilege is a spec change: the container is recreated
    // without it.
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/apps/{tool}"),
            &json!({"name": tool, "containers": [{"name": "main", "image": image,
                    "host_mounts": [{"source": source, "target": "/data", "read_only": true}]}]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    deploy(api, &agent.id, &tool).await;
    wait_converged(api, &docker, &agent.id, Duration::from_secs(30)).await;
    let hc = host_config(&docker, &agent.container_name(&tool, "main")).await;
    assert_eq!(hc.privileged, Some(false));
    assert_eq!(hc.binds, Some(vec![format!("{source}:/data:ro")]));
    orch.stop().await;
}
