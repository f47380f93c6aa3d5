//! The aarch64 agent, end to end: `drover-agent` cross-built for
//! `aarch64-unknown-linux-musl` by `scripts/build-arm.sh` runs under
//! `qemu-aarch64-static` (user-mode emulation) against a real `drover serve`
//! process, enrolls, reports `aarch64` in its inventory and applies a
//! desired state.
//!
//! The Docker side is this host's x86_64 Docker Engine: the emulated agent
//! talks to it over the real Unix socket, and the container it starts is
//! the x86_64 test image from the registry on 127.0.0.1:5000. So this
//! checks that the ARM build of the agent works, not that ARM images run.
//!
//! The binary is not built here: `scripts/test.sh` builds it (with
//! `bash scripts/build-arm.sh --agent-only --test`) before the tests, and a
//! missing one fails the test with that command.

use std::path::Path;
use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use serde_json::json;

const TARGET: &str = "aarch64-unknown-linux-musl";
/// Emulation makes everything the agent does several times slower.
const OP_TIMEOUT: Duration = Duration::from_secs(180);

/// ELF `e_machine` of a binary (offset 18, little-endian).
fn elf_machine(path: &Path) -> u16 {
    let bytes = std::fs::read(path).expect("read agent binary");
    assert!(
        bytes.len() > 20 && bytes.starts_with(b"\x7fELF"),
        "{} is not an ELF file",
        path.display()
    );
    u16::from_le_bytes([bytes[18], bytes[19]])
}

async fn container_running(docker: &bollard::Docker, name: &str) -> Option<bool> {
    match docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
    {
        Ok(c) => Some(c.state.and_then(|s| s.running).unwrap_or(false)),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu_enrolls_reports_arch_and_deploys() {
    let agent_bin = cross_agent_binary(TARGET);
    const EM_AARCH64: u16 = 183;
    assert_eq!(
        elf_machine(&agent_bin),
        EM_AARCH64,
        "{} is not an aarch64 binary",
        agent_bin.display()
    );
    let qemu = program_on_path("qemu-aarch64-static", "qemu-user-static");
    let docker = docker().await;

    let orch = OrchProc::start().await;
    let api = &orch.api;
    let mut agent = Agent::spawn_command(
        &orch.broker_url(),
        &unique("arm64"),
        &[qemu, agent_bin],
        "info",
    );

    // Enrolled (the harness hands it a one-time token) and online, with
    // the inventory its Hello carried.
    let dev = wait_for(
        Duration::from_secs(90),
        "the aarch64 agent online with its inventory",
        || async {
            api.device(&agent.id).await.filter(|d| {
                d["online"] == json!(true)
                    && d["inventory"]["docker_version"]
                        .as_str()
                        .is_some_and(|v| !v.is_empty())
            })
        },
    )
    .await;
    assert!(agent.running(), "the agent exited: {}", agent.log_text());
    assert!(
        agent.state_dir.path().join("credential").exists(),
        "the agent kept the credential it enrolled for"
    );
    let inv = &dev["inventory"];
    assert_eq!(inv["arch"], json!("aarch64"), "{inv}");
    // Images run on the Docker daemon, here the host's x86_64 one, so the
    // platform it reports and pulls for is the daemon's, not the binary's.
    assert_eq!(dev["platform"], json!("linux/amd64"), "{dev}");
    assert!(
        !inv["kernel"].as_str().unwrap_or_default().is_empty(),
        "{inv}"
    );
    assert!(inv["memory_bytes"].as_u64().unwrap_or(0) > 0, "{inv}");

    // A desired state: one app from a tag only the registry has, so the
    // agent pulls it through the host's Docker Engine.
    let tag = unique("arm");
    let image = fresh_image(&tag).await;
    let app = unique("app");
    api.create_app(&app, &image).await;
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    let done = api.wait_op(&op, OP_TIMEOUT).await;
    assert_eq!(
        done["status"],
        json!("succeeded"),
        "{done}\nagent log:\n{}",
        agent.log_text()
    );
    let name = agent.container_name(&app, "main");
    assert_eq!(
        container_running(&docker, &name).await,
        Some(true),
        "container {name} runs"
    );
    let c = docker
        .inspect_container(&name, None::<InspectContainerOptions>)
        .await
        .expect("inspect");
    let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get("io.drover.device"), Some(&agent.id));

    // And back: the app removed from the device, the container gone.
    let (s, op) = api
        .delete(&format!("/api/v1/devices/{}/apps/{app}", agent.id))
        .await;
    assert_eq!(s, 202, "{op}");
    let done = api.wait_op(&op, OP_TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    assert_eq!(container_running(&docker, &name).await, None);

    agent.kill().await;
    untag(&image);
}
