//! Agents under adverse conditions: a `drover-agent` process whose state
//! directory is chosen by the test (so two agents can share one, or one can
//! be made read-only for the agent alone), whose Docker connection goes
//! through a cuttable socket proxy, and whose output is captured.
//!
//! Everything stays local: the read-only state directory is a bind mount
//! inside the agent's own private mount namespace (`unshare -m`), invisible
//! to the rest of the machine; the Docker proxy is a Unix socket in a
//! temporary directory in front of the real daemon's socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::{binary, remove_device_containers, wait_for, Api};

/// The Docker daemon's socket, as `DOCKER_HOST` would name it by default.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// How the state directory looks to the agent process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateDirMode {
    Writable,
    /// A read-only bind mount over the directory, in the agent's own mount
    /// namespace: the agent cannot write it (root or not), the test can.
    ReadOnly,
    /// A full file system: a small tmpfs over the directory in the agent's
    /// own mount namespace, holding a copy of the directory's files and
    /// filled to the last byte. Creating a file still works, writing to it
    /// fails with "No space left on device". The test sees it through
    /// [`LabAgent::agent_view`].
    Full,
}

/// A `drover-agent` process. Dropping it kills the process and removes the
/// containers labelled for its device id.
pub struct LabAgent {
    pub id: String,
    pub state_dir: PathBuf,
    broker_url: String,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
    log_dir: tempfile::TempDir,
    /// The enrollment API, used once while the state directory holds no
    /// credential.
    enroll: Option<Api>,
}

impl LabAgent {
    /// Not started yet; see [`LabAgent::start`].
    pub fn new(broker_url: &str, id: &str, state_dir: &Path) -> LabAgent {
        LabAgent {
            id: id.to_string(),
            state_dir: state_dir.to_path_buf(),
            broker_url: broker_url.to_string(),
            extra_args: Vec::new(),
            env: Vec::new(),
            child: None,
            log_dir: tempfile::tempdir().expect("tempdir"),
            enroll: None,
        }
    }

    /// Enrolls through `api` when the state directory has no credential.
    pub fn enrolling_with(mut self, api: &Api) -> LabAgent {
        self.enroll = Some(api.clone());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> LabAgent {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn args(mut self, args: &[&str]) -> LabAgent {
        self.extra_args
            .extend(args.iter().map(|a| (*a).to_string()));
        self
    }

    /// Points the agent at another broker for its next start.
    pub fn set_broker(&mut self, broker_url: &str) {
        self.broker_url = broker_url.to_string();
    }

    pub async fn start(&mut self, mode: StateDirMode) {
        assert!(self.child.is_none(), "agent {} already started", self.id);
        let token = match &self.enroll {
            Some(api) if !self.state_dir.join("credential").exists() => {
                Some(api.enroll_token(&self.id).await)
            }
            _ => None,
        };
        let agent = binary("drover-agent");
        let mut cmd = match mode {
            StateDirMode::Writable => tokio::process::Command::new(&agent),
            StateDirMode::Full => {
                let mut c = tokio::process::Command::new("unshare");
                // The copy lives only until the tmpfs holds it.
                c.args([
                    "--mount",
                    "--",
                    "sh",
                    "-c",
                    r#"set -e; copy=$(mktemp -d); cp -a "$0"/. "$copy"/;
                       mount -t tmpfs -o size=512k,mode=0700 tmpfs "$0";
                       cp -a "$copy"/. "$0"/; rm -rf "$copy";
                       dd if=/dev/zero of="$0/.fill" bs=4096 2>/dev/null || true;
                       exec "$@""#,
                ])
                .arg(&self.state_dir)
                .arg(&agent);
                c
            }
            StateDirMode::ReadOnly => {
                let mut c = tokio::process::Command::new("unshare");
                // A private mount namespace (util-linux makes its mounts
                // private), a read-only bind of the state directory onto
                // itself, then the agent in place of the shell.
                c.args([
                    "--mount",
                    "--",
                    "sh",
                    "-c",
                    r#"mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@""#,
                ])
                .arg(&self.state_dir)
                .arg(&agent);
                c
            }
        };
        match token {
            Some(t) => cmd.env("DROVER_ENROLL_TOKEN", t),
            None => cmd.env_remove("DROVER_ENROLL_TOKEN"),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log file");
        let err = file.try_clone().expect("agent log file");
        cmd.args(["--broker", &self.broker_url, "--device-id", &self.id])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args([
                "--keep-alive-secs",
                "2",
                "--heartbeat-secs",
                "1",
                "--telemetry-secs",
                "1",
                "--reconcile-secs",
                "5",
            ])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().expect("spawn drover-agent"));
    }

    /// The state directory as the running agent sees it (through its own
    /// mount namespace).
    pub fn agent_view(&self) -> PathBuf {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("agent running");
        let inside = self.state_dir.strip_prefix("/").unwrap_or(&self.state_dir);
        PathBuf::from(format!("/proc/{pid}/root")).join(inside)
    }

    fn log_path(&self) -> PathBuf {
        self.log_dir.path().join("agent.log")
    }

    /// Everything the agent printed so far, over all its starts.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the process to exit on its own; its exit status.
    pub async fn exited(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("agent started");
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .unwrap_or_else(|_| panic!("agent {} still running after {timeout:?}", self.id))
            .expect("wait for agent");
        self.child = None;
        status
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill agent");
        }
    }

    /// SIGTERM (a clean shutdown), then waits for the process to exit.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                c.kill().await.expect("kill agent");
            }
        }
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
        remove_device_containers(&self.id);
    }
}

/// A Unix socket in front of the Docker daemon's. An agent given
/// `DOCKER_HOST=`[`DockerProxy::docker_host`] reaches Docker only through
/// it; [`DockerProxy::cut`] makes Docker unreachable for that agent alone
/// (live connections close, new ones are refused) without touching the
/// daemon, which other tests share.
pub struct DockerProxy {
    dir: tempfile::TempDir,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl DockerProxy {
    pub async fn start() -> DockerProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind docker proxy");
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = cut_rx.clone();
                if *rx.borrow_and_update() {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::UnixStream::connect(DOCKER_SOCKET).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut up) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        DockerProxy { dir, cut, task }
    }

    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_replace(true);
    }
}

/// The device's events as the orchestrator's API lists them.
pub async fn device_events(api: &Api, device: &str) -> Vec<Value> {
    let (s, v) = api.get(&format!("/api/v1/devices/{device}/events")).await;
    assert_eq!(s, 200, "events of {device}: {v}");
    v.as_array().cloned().unwrap_or_default()
}

/// Waits for an event of `kind` whose detail satisfies `detail`.
pub async fn wait_event(
    api: &Api,
    device: &str,
    kind: &str,
    timeout: Duration,
    detail: impl Fn(&str) -> bool,
) -> Value {
    wait_for(
        timeout,
        &format!("a {kind} event from {device}"),
        || async {
            device_events(api, device)
                .await
                .into_iter()
                .find(|e| e["kind"] == kind && detail(e["detail"].as_str().unwrap_or_default()))
        },
    )
    .await
}

/// Waits until the orchestrator shows `device` online with an inventory.
pub async fn wait_online(api: &Api, device: &str, timeout: Duration) -> Value {
    wait_for(timeout, &format!("device {device} online"), || async {
        api.device(device)
            .await
            .filter(|d| d["online"] == Value::Bool(true) && d["inventory"].is_object())
    })
    .await
}

/// The app named `app` in a device view's last state report.
pub fn observed_app(device: &Value, app: &str) -> Option<Value> {
    device["observed"]["apps"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == serde_json::json!(app))
        .cloned()
}

/// Publishes `desired` (a `DesiredState` as JSON) retained on the device's
/// `desired` topic of an open broker, as any MQTT client could.
pub async fn publish_desired(orch: &crate::Orch, id: &str, desired: Value) {
    use drover_shared::model::DesiredState;
    use drover_shared::payload::Desired;
    use drover_shared::topic::{TopicKind, Topics};
    let state: DesiredState = serde_json::from_value(desired).expect("desired state");
    let device = drover_shared::DeviceId::new(id.to_string()).expect("device id");
    let topic = Topics::default().device(&device, TopicKind::Desired);
    crate::mosquitto_pub(
        orch.mqtt_port,
        &topic,
        &drover_shared::encode(&Desired { state }),
        true,
    )
    .await;
}
