//! The one integration harness every end-to-end test shares.
//!
//! Real parts only: the orchestrator with its embedded rumqttd broker runs
//! in the test process on free ports; each device agent is a real
//! `drover-agent` process (so it can be SIGKILLed) driving the machine's
//! real Docker Engine; images come from the real registry on
//! 127.0.0.1:5000 that `scripts/test-env.sh` starts. Nothing is skipped
//! when a service is missing: the harness fails with what to run.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bollard::Docker;
use drover::server::{self, BrokerMode, ServerConfig};
use serde_json::Value;
use tokio::sync::oneshot;

pub const REGISTRY: &str = "127.0.0.1:5000";
/// Pushed by `scripts/test-env.sh`.
pub const BASE_REPO: &str = "drover/busybox";
pub const BASE_TAG: &str = "2";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A name unique to this test run, usable as device id, app name or tag.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("{prefix}-{}-{:x}-{}", std::process::id(), t % 0xff_ffff, N.fetch_add(1, Ordering::Relaxed))
}

/// Polls `f` until it returns `Some`, or panics naming what never happened.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ----- binaries ------------------------------------------------------------

fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(|p| p.parent()).expect("target dir").to_path_buf()
}

/// Path of a workspace binary, built (or rebuilt if stale) once per test
/// process so a test never runs an old agent.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "drover", "-p", "drover-agent", "--bins"]);
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "building drover and drover-agent failed");
    });
    let p = target_dir().join(name);
    assert!(p.exists(), "{} is missing; run `cargo build --workspace --bins`", p.display());
    p
}

// ----- environment ---------------------------------------------------------

pub async fn docker() -> Docker {
    let d = Docker::connect_with_local_defaults().expect("docker client");
    let d = d.negotiate_version().await.expect(
        "the Docker daemon is not reachable; run `bash scripts/test-env.sh` (it starts Docker and the registry)",
    );
    d.ping().await.expect("docker ping");
    d
}

/// Makes a fresh tag of the test image in the registry by re-putting its
/// manifest (no local copy involved), so the agent must pull it from the
/// registry and no other test can have it locally.
pub async fn fresh_image(tag: &str) -> String {
    let http = reqwest::Client::new();
    let accept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";
    let resp = http
        .get(format!("http://{REGISTRY}/v2/{BASE_REPO}/manifests/{BASE_TAG}"))
        .header("Accept", accept)
        .send()
        .await
        .expect("the registry at 127.0.0.1:5000 is not reachable; run `bash scripts/test-env.sh`");
    assert!(resp.status().is_success(), "test image missing from the registry ({}); run `bash scripts/test-env.sh`", resp.status());
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = resp.bytes().await.expect("manifest body");
    let put = http
        .put(format!("http://{REGISTRY}/v2/{BASE_REPO}/manifests/{tag}"))
        .header("Content-Type", ctype)
        .body(body)
        .send()
        .await
        .expect("put manifest");
    assert!(put.status().is_success(), "tagging test image failed: {}", put.status());
    format!("{REGISTRY}/{BASE_REPO}:{tag}")
}

// ----- orchestrator ----------------------------------------------------------

/// An orchestrator running in this process with its embedded broker.
pub struct Orch {
    pub api: Api,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    pub data: tempfile::TempDir,
}

impl Orch {
    /// With the embedded broker on a free port.
    pub async fn start() -> Orch {
        Orch::start_with(BrokerMode::Embedded { listen: "127.0.0.1:0".parse().expect("addr") }).await
    }

    pub async fn start_with(broker: BrokerMode) -> Orch {
        init_tracing();
        let data = tempfile::tempdir().expect("tempdir");
        let mut cfg = ServerConfig::new(data.path().to_path_buf());
        cfg.api_listen = "127.0.0.1:0".parse().expect("addr");
        cfg.broker = broker;
        cfg.client_id = unique("orch");
        let (tx, rx) = oneshot::channel::<()>();
        let orch = server::start(cfg, async move {
            let _ = rx.await;
        })
        .await
        .expect("orchestrator starts");
        let api = Api::new(format!("http://{}", orch.api_addr));
        let (mqtt_host, mqtt_port) = orch.mqtt_addr.clone();
        let done = tokio::spawn(async move {
            let _ = orch.wait().await;
        });
        Orch { api, mqtt_host, mqtt_port, stop: Some(tx), done: Some(done), data }
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://{}:{}", self.mqtt_host, self.mqtt_port)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), d).await;
        }
    }
}

/// A small JSON client for the REST API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Api {
        Api { base, http: reqwest::Client::new() }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(format!("{}{path}", self.base))).await
    }

    /// Creates a one-container app and asserts it was accepted.
    pub async fn create_app(&self, name: &str, image: &str) {
        let (s, v) = self
            .post("/api/v1/apps", &serde_json::json!({"name": name, "containers": [{"name": "main", "image": image}]}))
            .await;
        assert_eq!(s, 201, "create app: {v}");
    }

    /// Waits until an operation is final and returns it.
    pub async fn wait_op(&self, op: &Value, timeout: Duration) -> Value {
        let id = op["id"].as_str().expect("operation id").to_string();
        wait_for(timeout, &format!("operation {id} to finish"), || async {
            let (_, v) = self.get(&format!("/api/v1/operations/{id}")).await;
            let st = v["status"].as_str().unwrap_or_default();
            matches!(st, "succeeded" | "failed" | "superseded").then_some(v)
        })
        .await
    }

    pub async fn device(&self, id: &str) -> Option<Value> {
        let (s, v) = self.get(&format!("/api/v1/devices/{id}")).await;
        (s == 200).then_some(v)
    }
}

/// Reads one counter from the orchestrator's `/metrics`.
pub async fn metric(api: &Api, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", api.base)).await.expect("metrics").text().await.expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

// ----- outside brokers and clients -------------------------------------------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A real Mosquitto broker (Debian's) on a free loopback port.
pub struct Mosquitto {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_packet_size 300000\n"))
            .expect("write mosquitto.conf");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is not installed; run `bash scripts/test-env.sh`");
        wait_for(Duration::from_secs(10), "mosquitto listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        Mosquitto { port, child, _dir: dir }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes with Debian's `mosquitto_pub`, an MQTT client that is not ours.
pub async fn mosquitto_pub(port: u16, topic: &str, payload: &[u8], retain: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payload");
    std::fs::write(&file, payload).expect("write payload");
    let mut cmd = tokio::process::Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic]).arg("-f").arg(&file);
    if retain {
        cmd.arg("-r");
    }
    let out = cmd.output().await.expect("mosquitto_pub is not installed; run `bash scripts/test-env.sh`");
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
}

// ----- agents ----------------------------------------------------------------

/// A real `drover-agent` process. Dropping it kills the process and removes
/// every container it managed (and nothing else).
pub struct Agent {
    pub id: String,
    child: Option<tokio::process::Child>,
    pub state_dir: tempfile::TempDir,
}

impl Agent {
    pub fn spawn(broker_url: &str, id: &str) -> Agent {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let mut a = Agent { id: id.to_string(), child: None, state_dir };
        a.start(broker_url);
        a
    }

    pub fn start(&mut self, broker_url: &str) {
        let child = tokio::process::Command::new(binary("drover-agent"))
            .args(["--broker", broker_url, "--device-id", &self.id])
            .arg("--state-dir")
            .arg(self.state_dir.path())
            .args(["--keep-alive-secs", "2", "--heartbeat-secs", "1", "--telemetry-secs", "1", "--reconcile-secs", "5"])
            .env("RUST_LOG", std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn drover-agent");
        self.child = Some(child);
    }

    /// SIGKILL: no clean offline message, only the broker's Last Will.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill agent");
        }
    }

    pub fn container_name(&self, app: &str, container: &str) -> String {
        format!("drover-{}-{app}-{container}", self.id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
        // Remove what this agent managed, found by its device label.
        let out = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=io.drover.device={}", self.id)])
            .output();
        if let Ok(out) = out {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker").args(["rm", "-f"]).args(&ids).output();
            }
        }
    }
}

/// Removes a local image tag if present (cleanup; errors ignored).
pub fn untag(image: &str) {
    let _ = std::process::Command::new("docker").args(["rmi", image]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}
