//! The one integration harness every end-to-end test shares.
//!
//! Real parts only: the orchestrator with its embedded rumqttd broker runs
//! in the test process on free ports; each device agent is a real
//! `drover-agent` process (so it can be SIGKILLed) driving the machine's
//! real Docker Engine; images come from the real registry on
//! 127.0.0.1:5000 that `scripts/test-env.sh` starts. Nothing is skipped
//! when a service is missing: the harness fails with what to run.

#![forbid(unsafe_code)]

pub mod browser;
pub mod netns;
pub mod schemathesis;
pub mod systemd;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bollard::Docker;
use drover::server::{self, BrokerMode, ServerConfig};
use serde_json::Value;
use tokio::sync::oneshot;

pub mod agent_lab;

pub const REGISTRY: &str = "127.0.0.1:5000";
/// Pushed by `scripts/test-env.sh`.
pub const BASE_REPO: &str = "drover/busybox";
pub const BASE_TAG: &str = "2";
/// The same storage as [`REGISTRY`] behind htpasswd authentication, started
/// by `scripts/test-env.sh` with exactly these credentials.
pub const AUTH_REGISTRY: &str = "127.0.0.1:5001";
pub const AUTH_REGISTRY_USER: &str = "drover-test";
pub const AUTH_REGISTRY_PASSWORD: &str = "drover-registry-pw-7f3c91e2";

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
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        t % 0xff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
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
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ----- binaries ------------------------------------------------------------

fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary, built (or rebuilt if stale) once per test
/// process so a test never runs an old agent.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "drover",
            "-p",
            "drover-agent",
            "--bins",
        ]);
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "building drover and drover-agent failed");
    });
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing; run `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// Path of `drover-agent` cross-built for `target` (e.g.
/// `aarch64-unknown-linux-musl`) by `scripts/build-arm.sh`, in the same
/// profile as this test. Never built here: a missing one fails the test
/// with the command that builds it.
pub fn cross_agent_binary(target: &str) -> PathBuf {
    let profile_dir = target_dir();
    let profile = profile_dir.file_name().expect("profile directory name");
    let root = profile_dir.parent().expect("target directory");
    let p = root.join(target).join(profile).join("drover-agent");
    let release = if profile == "release" {
        " --release"
    } else {
        ""
    };
    assert!(
        p.exists(),
        "{} is missing; build it with `bash scripts/build-arm.sh --agent-only{release}` \
         (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Full path of a program on `PATH`, or a failure naming the Debian
/// package that provides it and the script that installs it.
pub fn program_on_path(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH; install {package} (`bash scripts/test-env.sh` does)")
        })
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
        .get(format!(
            "http://{REGISTRY}/v2/{BASE_REPO}/manifests/{BASE_TAG}"
        ))
        .header("Accept", accept)
        .send()
        .await
        .expect("the registry at 127.0.0.1:5000 is not reachable; run `bash scripts/test-env.sh`");
    assert!(
        resp.status().is_success(),
        "test image missing from the registry ({}); run `bash scripts/test-env.sh`",
        resp.status()
    );
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.bytes().await.expect("manifest body");
    let put = http
        .put(format!("http://{REGISTRY}/v2/{BASE_REPO}/manifests/{tag}"))
        .header("Content-Type", ctype)
        .body(body)
        .send()
        .await
        .expect("put manifest");
    assert!(
        put.status().is_success(),
        "tagging test image failed: {}",
        put.status()
    );
    format!("{REGISTRY}/{BASE_REPO}:{tag}")
}

// ----- orchestrator ----------------------------------------------------------

/// An orchestrator running in this process with its embedded broker.
pub struct Orch {
    pub api: Api,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// The embedded broker's MQTTS listener, when configured.
    pub mqtts_addr: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    pub data: tempfile::TempDir,
}

impl Orch {
    /// With the embedded broker on a free port.
    pub async fn start() -> Orch {
        Orch::start_with(BrokerMode::Embedded {
            listen: "127.0.0.1:0".parse().expect("addr"),
        })
        .await
    }

    pub async fn start_with(broker: BrokerMode) -> Orch {
        Orch::start_config(|cfg| cfg.broker = broker).await
    }

    /// With the embedded broker letting every client do anything
    /// (`--insecure-open-broker`), for tests about payloads, not access.
    pub async fn start_open() -> Orch {
        Orch::start_config(|cfg| cfg.mqtt_auth = false).await
    }

    /// With the embedded broker on a free port, after `configure` has
    /// changed the settings (e.g. to add an MQTTS listener).
    pub async fn start_config(configure: impl FnOnce(&mut ServerConfig)) -> Orch {
        init_tracing();
        let data = tempfile::tempdir().expect("tempdir");
        let mut cfg = ServerConfig::new(data.path().to_path_buf());
        cfg.api_listen = "127.0.0.1:0".parse().expect("addr");
        cfg.broker = BrokerMode::Embedded {
            listen: "127.0.0.1:0".parse().expect("addr"),
        };
        cfg.client_id = unique("orch");
        configure(&mut cfg);
        let embedded = matches!(cfg.broker, BrokerMode::Embedded { .. });
        let token_file = cfg
            .data_dir
            .join(drover::security::access::ADMIN_TOKEN_FILE);
        let mqtt_auth = cfg.mqtt_auth;
        let (tx, rx) = oneshot::channel::<()>();
        let orch = server::start(cfg, async move {
            let _ = rx.await;
        })
        .await
        .expect("orchestrator starts");
        // A new data dir gets an admin token; a reused one (a restart)
        // keeps the file from its first start.
        let token = std::fs::read_to_string(orch.admin_token_file.as_ref().unwrap_or(&token_file))
            .expect("admin token file");
        let api = Api::new(format!("http://{}", orch.api_addr)).with_token(Some(token.trim()));
        let (mqtt_host, mqtt_port) = orch.mqtt_addr.clone();
        if embedded && mqtt_auth {
            register_enroller(&format!("mqtt://{mqtt_host}:{mqtt_port}"), &api);
        }
        let mqtts_addr = orch.mqtts_addr;
        let done = tokio::spawn(async move {
            let _ = orch.wait().await;
        });
        Orch {
            api,
            mqtt_host,
            mqtt_port,
            mqtts_addr,
            stop: Some(tx),
            done: Some(done),
            data,
        }
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

/// A small JSON client for the REST API, sending its bearer token (if any)
/// with every request.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
    pub token: Option<String>,
}

impl Api {
    pub fn new(base: String) -> Api {
        Api {
            base,
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The same API with another token (`None`: no Authorization header).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            base: self.base.clone(),
            http: self.http.clone(),
            token: token.map(str::to_string),
        }
    }

    /// Creates an API token with this role (as this API's caller) and
    /// returns a client using it.
    pub async fn as_role(&self, name: &str, role: &str) -> Api {
        let (s, v) = self
            .post(
                "/api/v1/tokens",
                &serde_json::json!({"name": name, "role": role}),
            )
            .await;
        assert_eq!(s, 201, "create {role} token: {v}");
        self.with_token(v["token"].as_str())
    }

    /// An enrollment token only `device` can use, once.
    pub async fn enroll_token(&self, device: &str) -> String {
        let (s, v) = self
            .post(
                "/api/v1/enrollment-tokens",
                &serde_json::json!({"ttl_secs": 600, "uses": 1, "device_id": device}),
            )
            .await;
        assert_eq!(s, 201, "create enrollment token: {v}");
        v["token"].as_str().expect("token").to_string()
    }

    /// For an https:// API whose certificate `ca` (PEM) signed.
    pub fn with_ca(base: String, ca: &std::path::Path) -> Api {
        let http = drover::cli::trust::http_client(Some(ca))
            .expect("CA certificate")
            .build()
            .expect("http client");
        Api {
            base,
            http,
            token: None,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.expect("API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// POSTs raw bytes as `application/octet-stream`.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/octet-stream")
                .body(body),
        )
        .await
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> (u16, Value) {
        self.send(
            self.http
                .request(method, format!("{}{path}", self.base))
                .json(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
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
    let text = reqwest::get(format!("{}/metrics", api.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

// ----- enrollment ------------------------------------------------------------

fn enrollers() -> &'static std::sync::Mutex<std::collections::HashMap<String, Api>> {
    static E: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Api>>> = OnceLock::new();
    E.get_or_init(Default::default)
}

/// Agents started against `broker_url` enroll through this API.
pub fn register_enroller(broker_url: &str, api: &Api) {
    enrollers()
        .lock()
        .expect("lock")
        .insert(broker_url.to_string(), api.clone());
}

// ----- outside brokers and clients -------------------------------------------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A real Mosquitto broker (Debian's) on a free loopback port.
pub struct Mosquitto {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        Mosquitto::start_with("").await
    }

    /// With extra lines for its one listener, e.g. `certfile ...` for TLS.
    pub async fn start_with(listener_conf: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\n{listener_conf}\nallow_anonymous true\npersistence false\nmax_packet_size 300000\n"))
            .expect("write mosquitto.conf");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is not installed; run `bash scripts/test-env.sh`");
        wait_for(Duration::from_secs(10), "mosquitto listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Mosquitto {
            port,
            child,
            _dir: dir,
        }
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
    if retain {
        cmd.arg("-r");
    }
    run_mosquitto_pub(&mut cmd).await;
}

/// Runs a prepared `mosquitto_pub`; its failure fails the test.
async fn run_mosquitto_pub(cmd: &mut tokio::process::Command) {
    let out = cmd
        .output()
        .await
        .expect("mosquitto_pub is not installed; run `bash scripts/test-env.sh`");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new automation identity (`POST /api/v1/mqtt-users`) allowed these
/// topic filters: (username, password).
pub async fn automation(api: &Api, subscribe: &[String], publish: &[String]) -> (String, String) {
    let (s, v) = api
        .post(
            "/api/v1/mqtt-users",
            &serde_json::json!({"name": unique("rules"), "subscribe": subscribe, "publish": publish}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    (
        v["username"].as_str().expect("username").to_string(),
        v["password"].as_str().expect("password").to_string(),
    )
}

/// Publishes `payload` with QoS 1 as `login` (username, password), with
/// Debian's `mosquitto_pub`.
pub async fn publish_as(port: u16, login: &(String, String), topic: &str, payload: &str) {
    run_mosquitto_pub(
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(["-t", topic, "-m", payload, "-u", &login.0, "-P", &login.1])
            .args(["-i", &unique("pub")]),
    )
    .await;
}

// ----- agents ----------------------------------------------------------------

/// A real `drover-agent` process. Dropping it kills the process and removes
/// every container it managed (and nothing else).
pub struct Agent {
    pub id: String,
    child: Option<tokio::process::Child>,
    pub state_dir: tempfile::TempDir,
    /// Flags added after the harness's defaults on every (re)start.
    extra_args: Vec<String>,
    /// With [`Agent::spawn_logged`]: stdout and stderr go to this file
    /// (outside the state directory) with this `RUST_LOG` filter.
    log: Option<(tempfile::TempDir, String)>,
    /// With [`Agent::spawn_command`]: the program (and its first arguments)
    /// started instead of the host's `drover-agent`.
    command: Vec<PathBuf>,
}

impl Agent {
    pub fn spawn(broker_url: &str, id: &str) -> Agent {
        Agent::spawn_with(broker_url, id, &[])
    }

    /// With extra flags (e.g. `--pull-retry-base-ms 200`), kept for restarts.
    /// They must not repeat a default flag: clap rejects a flag given twice.
    pub fn spawn_with(broker_url: &str, id: &str, extra_args: &[&str]) -> Agent {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let extra_args = extra_args.iter().map(|a| (*a).to_string()).collect();
        let mut a = Agent {
            id: id.to_string(),
            child: None,
            state_dir,
            extra_args,
            log: None,
            command: Vec::new(),
        };
        a.start(broker_url);
        a
    }

    /// Like [`Agent::spawn_logged`], started as `command` (a program and
    /// its leading arguments, e.g. `qemu-aarch64-static` and a cross-built
    /// agent) instead of the host's `drover-agent`; the harness's flags
    /// follow it.
    pub fn spawn_command(broker_url: &str, id: &str, command: &[PathBuf], filter: &str) -> Agent {
        assert!(!command.is_empty(), "spawn_command needs a program");
        let mut a = Agent {
            id: id.to_string(),
            child: None,
            state_dir: tempfile::tempdir().expect("tempdir"),
            extra_args: Vec::new(),
            log: Some((tempfile::tempdir().expect("tempdir"), filter.to_string())),
            command: command.to_vec(),
        };
        a.start(broker_url);
        a
    }

    /// The process id of the running agent (of its emulator, with
    /// [`Agent::spawn_command`] and an emulator).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// Like [`Agent::spawn`], with everything the process prints captured
    /// (read it with [`Agent::log_text`]) at the `RUST_LOG` level `filter`.
    pub fn spawn_logged(broker_url: &str, id: &str, filter: &str) -> Agent {
        let mut a = Agent {
            id: id.to_string(),
            child: None,
            state_dir: tempfile::tempdir().expect("tempdir"),
            extra_args: Vec::new(),
            log: Some((tempfile::tempdir().expect("tempdir"), filter.to_string())),
            command: Vec::new(),
        };
        a.start(broker_url);
        a
    }

    /// Everything the agent printed so far (with [`Agent::spawn_logged`]).
    pub fn log_text(&self) -> String {
        let (dir, _) = self.log.as_ref().expect("spawned with spawn_logged");
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn start(&mut self, broker_url: &str) {
        // A broker that checks credentials: enroll the first time, with a
        // token made for this device id (the credential is kept in the state
        // directory for restarts).
        let mut token = None;
        if !self.state_dir.path().join("credential").exists() {
            if let Some(api) = enrollers().lock().expect("lock").get(broker_url).cloned() {
                let id = self.id.clone();
                token = Some(
                    std::thread::spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime")
                            .block_on(api.enroll_token(&id))
                    })
                    .join()
                    .expect("enrollment token"),
                );
            }
        }
        self.launch(broker_url, token.as_deref());
    }

    /// Starts with `DROVER_ENROLL_TOKEN=token`, whatever credential the
    /// state directory holds.
    pub fn start_with_token(&mut self, broker_url: &str, token: &str) {
        self.launch(broker_url, Some(token));
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn launch(&mut self, broker_url: &str, token: Option<&str>) {
        let mut cmd = match self.command.split_first() {
            Some((program, args)) => {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args);
                cmd
            }
            None => tokio::process::Command::new(binary("drover-agent")),
        };
        match token {
            Some(t) => cmd.env("DROVER_ENROLL_TOKEN", t),
            None => cmd.env_remove("DROVER_ENROLL_TOKEN"),
        };
        let filter = match &self.log {
            Some((dir, filter)) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("agent.log"))
                    .expect("agent log file");
                let err = file.try_clone().expect("agent log file");
                cmd.stdout(file).stderr(err);
                filter.clone()
            }
            None => std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
        };
        let child = cmd
            .args(["--broker", broker_url, "--device-id", &self.id])
            .arg("--state-dir")
            .arg(self.state_dir.path())
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
            .env("RUST_LOG", filter)
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
        remove_device_containers(&self.id);
    }
}

/// Removes a local image tag if present (cleanup; errors ignored).
pub fn untag(image: &str) {
    let _ = std::process::Command::new("docker")
        .args(["rmi", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs the `drover` CLI against `api` with its token (DROVER_TOKEN) and
/// `stdin` as its standard input, from a directory without a default admin
/// token file; returns (success, stdout, stderr).
pub async fn drover_cli(api: &Api, args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(binary("drover"));
    cmd.arg("--api").arg(&api.base).args(args);
    cmd.current_dir(std::env::temp_dir())
        .env_remove("DROVER_TOKEN");
    if let Some(t) = &api.token {
        cmd.env("DROVER_TOKEN", t);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run drover");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    let out = child.wait_with_output().await.expect("drover output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ----- fault injection ---------------------------------------------------------
//
// Parts a test can break on purpose: an orchestrator process to SIGKILL and
// restart, a TCP proxy to partition agents from the broker, and a registry
// of the test's own to stop. All of them live on 127.0.0.1 only.

/// The orchestrator as a real `drover serve` process on ports picked once,
/// so it can be SIGKILLed and restarted on the same ports and data dir.
pub struct OrchProc {
    pub api: Api,
    pub api_port: u16,
    pub mqtt_port: u16,
    pub data: tempfile::TempDir,
    child: Option<tokio::process::Child>,
    /// With [`OrchProc::start_logged`]: where its output goes, and the
    /// `RUST_LOG` filter.
    log: Option<(tempfile::TempDir, String)>,
    /// Flags added to `drover serve` on every (re)start.
    extra_args: Vec<String>,
}

impl OrchProc {
    pub async fn start() -> OrchProc {
        OrchProc::start_full(&[], None, None).await
    }

    /// Like [`OrchProc::start`], with everything the process prints
    /// captured (read it with [`OrchProc::log_text`]) at the `RUST_LOG`
    /// level `filter`.
    pub async fn start_logged(filter: &str) -> OrchProc {
        let dir = tempfile::tempdir().expect("tempdir");
        OrchProc::start_full(&[], None, Some((dir, filter.to_string()))).await
    }

    /// With extra `drover serve` flags, kept for restarts. With `https_ca`
    /// the API is reached over HTTPS trusting that CA (pass the matching
    /// `--api-tls-cert`/`--api-tls-key` in `extra_args`).
    pub async fn start_with(extra_args: &[&str], https_ca: Option<&std::path::Path>) -> OrchProc {
        OrchProc::start_full(extra_args, https_ca, None).await
    }

    async fn start_full(
        extra_args: &[&str],
        https_ca: Option<&std::path::Path>,
        log: Option<(tempfile::TempDir, String)>,
    ) -> OrchProc {
        let data = tempfile::tempdir().expect("tempdir");
        let (api_port, mqtt_port) = (free_port(), free_port());
        let api = match https_ca {
            Some(ca) => Api::with_ca(format!("https://127.0.0.1:{api_port}"), ca),
            None => Api::new(format!("http://127.0.0.1:{api_port}")),
        };
        let mut o = OrchProc {
            api,
            api_port,
            mqtt_port,
            data,
            child: None,
            log,
            extra_args: extra_args.iter().map(|a| (*a).to_string()).collect(),
        };
        o.launch().await;
        let token = std::fs::read_to_string(o.data.path().join("admin.token"))
            .expect("drover serve wrote its admin token");
        o.api = o.api.with_token(Some(token.trim()));
        register_enroller(&o.broker_url(), &o.api);
        o
    }

    /// Everything the orchestrator printed so far (with [`OrchProc::start_logged`]).
    pub fn log_text(&self) -> String {
        let (dir, _) = self.log.as_ref().expect("started with start_logged");
        std::fs::read_to_string(dir.path().join("drover.log")).unwrap_or_default()
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// SIGKILL: no shutdown, no drain; the embedded broker dies with it.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill drover");
        }
    }

    /// Starts it again on the same ports and data dir (after [`OrchProc::kill`]).
    pub async fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart an orchestrator that is still running"
        );
        self.launch().await;
    }

    async fn launch(&mut self) {
        let mut cmd = tokio::process::Command::new(binary("drover"));
        let filter = match &self.log {
            Some((dir, filter)) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("drover.log"))
                    .expect("drover log file");
                let err = file.try_clone().expect("drover log file");
                cmd.stdout(file).stderr(err);
                filter.clone()
            }
            None => std::env::var("ORCH_LOG").unwrap_or_else(|_| "info,rumqttd=warn".into()),
        };
        let mut child = cmd
            .arg("serve")
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", self.mqtt_port)])
            .arg("--data-dir")
            .arg(self.data.path())
            .args(&self.extra_args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn drover serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = self.api.http.clone();
        loop {
            if let Some(status) = child.try_wait().expect("drover status") {
                panic!(
                    "drover serve exited during start-up ({status}); is port {} or {} taken?",
                    self.api_port, self.mqtt_port
                );
            }
            let ok = http
                .get(format!("{}/healthz", self.api.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "drover serve not healthy after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.child = Some(child);
    }
}

impl Drop for OrchProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
    }
}

/// A TCP proxy on a free loopback port forwarding to `127.0.0.1:upstream`.
/// Agents connect through it; [`Proxy::cut`] partitions them.
pub struct Proxy {
    pub port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = cut_rx.clone();
                if *rx.borrow_and_update() {
                    // Partitioned: the connection closes at once.
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut up) => {}
                        // Cut, or the proxy was dropped: both sockets close here.
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        let proxy = Proxy { port, cut, task };
        proxy.enroll_like(&format!("mqtt://127.0.0.1:{upstream}"));
        proxy
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Agents connecting through the proxy enroll with the orchestrator
    /// whose broker is behind it.
    pub fn enroll_like(&self, broker_url: &str) {
        let found = enrollers().lock().expect("lock").get(broker_url).cloned();
        if let Some(api) = found {
            register_enroller(&self.url(), &api);
        }
    }

    /// Closes every live connection; new ones are closed at once until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Ends every forwarding task too.
        self.cut.send_replace(true);
    }
}

/// Runs the docker CLI and returns its stdout; panics with stderr on failure.
pub async fn docker_cli(args: &[&str]) -> String {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The shared test image, pulled into the local daemon if it is not there.
pub async fn base_image_local() -> String {
    let base = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let present = tokio::process::Command::new("docker")
        .args(["image", "inspect", &base])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !present {
        docker_cli(&["pull", "-q", &base]).await;
    }
    base
}

/// A registry of the test's own: Debian's `docker-registry` on a free
/// loopback port with temporary storage. It can be stopped and started
/// again on the same port and storage. (The shared registry on
/// 127.0.0.1:5000 is never stopped: other tests use it in parallel.)
pub struct PrivateRegistry {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRegistry {
    pub async fn start() -> PrivateRegistry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("registry storage");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        std::fs::write(dir.path().join("registry.yml"), config).expect("write registry.yml");
        let mut r = PrivateRegistry {
            port,
            dir,
            child: None,
        };
        r.run().await;
        r
    }

    /// `host:port`, the prefix of its image references.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn run(&mut self) {
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("registry.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is not installed; run `bash scripts/test-env.sh`");
        self.child = Some(child);
        let url = format!("http://{}/v2/", self.addr());
        wait_for(
            Duration::from_secs(15),
            "private registry serving",
            || async {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Stops it (SIGKILL) and waits until its port refuses connections.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let port = self.port;
        wait_for(
            Duration::from_secs(10),
            "private registry port closed",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                    .then_some(())
            },
        )
        .await;
    }

    /// Starts it again on the same port and storage.
    pub async fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "the private registry is already running"
        );
        self.run().await;
    }

    /// Puts the shared test image into this registry as `repo:tag` and
    /// removes the local tag, so an agent has to pull it.
    pub async fn push_base(&self, repo_tag: &str) -> String {
        let base = base_image_local().await;
        let image = format!("{}/{repo_tag}", self.addr());
        docker_cli(&["tag", &base, &image]).await;
        docker_cli(&["push", "-q", &image]).await;
        docker_cli(&["rmi", &image]).await;
        image
    }

    /// Puts the test image plus one layer of `mb` MiB of random bytes into
    /// this registry as `repo:tag` (create, cp, commit: no build tool
    /// needed), and removes everything local, so a pull of it takes a while.
    pub async fn push_big(&self, repo_tag: &str, mb: usize) -> String {
        let base = base_image_local().await;
        let image = format!("{}/{repo_tag}", self.addr());
        let tmp = tempfile::tempdir().expect("tempdir");
        let blob = tmp.path().join("blob");
        std::fs::write(&blob, random_bytes(mb << 20)).expect("write blob");
        let builder = unique("drover-build");
        docker_cli(&["create", "--name", &builder, &base]).await;
        docker_cli(&[
            "cp",
            &blob.display().to_string(),
            &format!("{builder}:/blob"),
        ])
        .await;
        docker_cli(&["commit", &builder, &image]).await;
        docker_cli(&["rm", "-f", &builder]).await;
        docker_cli(&["push", "-q", &image]).await;
        docker_cli(&["rmi", &image]).await;
        image
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Incompressible bytes (xorshift), so a layer's size is its transfer size.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

// ----- convergence checks --------------------------------------------------------

/// One managed container as the Docker API shows it.
#[derive(Debug, Clone)]
pub struct SeenContainer {
    pub id: String,
    pub name: String,
    pub app: String,
    pub container: String,
    pub image: String,
    pub running: bool,
    pub started_at: String,
}

/// Every container labelled for `device`, read from the Docker API.
pub async fn device_containers(docker: &Docker, device: &str) -> Vec<SeenContainer> {
    use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("io.drover.device={device}")],
    )]);
    let list = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("list containers");
    let mut seen = Vec::new();
    for c in list {
        let Some(id) = c.id else { continue };
        // A container removed between list and inspect is simply not there.
        let Ok(i) = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        else {
            continue;
        };
        let config = i.config.unwrap_or_default();
        let labels = config.labels.unwrap_or_default();
        let state = i.state.unwrap_or_default();
        seen.push(SeenContainer {
            id,
            name: i
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            app: labels.get("io.drover.app").cloned().unwrap_or_default(),
            container: labels
                .get("io.drover.container")
                .cloned()
                .unwrap_or_default(),
            image: config.image.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            started_at: state.started_at.unwrap_or_default(),
        });
    }
    seen
}

/// `Ok` when Docker runs exactly what the orchestrator's latest desired
/// state for `device` says, and the device reports that generation as
/// applied; otherwise what differs.
pub async fn converged(api: &Api, docker: &Docker, device: &str) -> Result<(), String> {
    let view = api
        .device(device)
        .await
        .ok_or_else(|| format!("device {device} unknown"))?;
    let desired = &view["desired"];
    let generation = desired["generation"].as_u64().unwrap_or(0);
    let applied = view["applied_generation"].as_u64().unwrap_or(0);
    if applied != generation {
        return Err(format!(
            "device applied generation {applied}, desired is {generation}"
        ));
    }
    let seen = device_containers(docker, device).await;
    let mut problems = Vec::new();
    let mut expected = std::collections::HashSet::new();
    for app in desired["apps"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let app_name = app["spec"]["name"].as_str().unwrap_or_default();
        let should_run = app["run"] == "running";
        for spec in app["spec"]["containers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let cname = spec["name"].as_str().unwrap_or_default();
            let image = spec["image"].as_str().unwrap_or_default();
            let name = format!("drover-{device}-{app_name}-{cname}");
            expected.insert(name.clone());
            let found: Vec<&SeenContainer> = seen
                .iter()
                .filter(|c| c.app == app_name && c.container == cname)
                .collect();
            match found.as_slice() {
                [] => problems.push(format!("{name}: missing")),
                [c] => {
                    if c.name != name {
                        problems.push(format!(
                            "{app_name}/{cname}: named {}, expected {name}",
                            c.name
                        ));
                    }
                    if c.running != should_run {
                        problems.push(format!(
                            "{name}: running={}, desired run={}",
                            c.running, app["run"]
                        ));
                    }
                    let tagged = image
                        .rsplit('/')
                        .next()
                        .is_some_and(|last| last.contains(':') || last.contains('@'));
                    // An untagged reference means `:latest`.
                    let same =
                        c.image == image || (!tagged && c.image == format!("{image}:latest"));
                    if !same {
                        problems.push(format!("{name}: image {}, desired {image}", c.image));
                    }
                }
                many => problems.push(format!("{name}: {} containers (duplicates)", many.len())),
            }
        }
    }
    for c in seen.iter().filter(|c| !expected.contains(&c.name)) {
        problems.push(format!(
            "{}: managed for {device} but not desired (app {}, container {})",
            c.name, c.app, c.container
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("generation {generation}: {}", problems.join("; ")))
    }
}

/// Polls [`converged`] until it holds; returns how long that took, or
/// panics with the last difference seen.
pub async fn wait_converged(
    api: &Api,
    docker: &Docker,
    device: &str,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let Err(last) = converged(api, docker, device).await else {
            return start.elapsed();
        };
        assert!(
            start.elapsed() < timeout,
            "device {device} not converged after {timeout:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every operation of `device`, newest first.
pub async fn operations(api: &Api, device: &str) -> Vec<Value> {
    let (s, v) = api
        .get(&format!("/api/v1/operations?device={device}&limit=10000"))
        .await;
    assert_eq!(s, 200, "list operations: {v}");
    v.as_array().cloned().unwrap_or_default()
}

fn is_final(op: &Value) -> bool {
    matches!(
        op["status"].as_str(),
        Some("succeeded" | "failed" | "superseded")
    )
}

/// Polls until every operation of `device` is final (succeeded, failed or
/// superseded); returns them, newest first, or panics naming the open ones.
pub async fn wait_all_ops_final(api: &Api, device: &str, timeout: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let ops = operations(api, device).await;
        let open: Vec<&Value> = ops.iter().filter(|o| !is_final(o)).collect();
        if open.is_empty() {
            return ops;
        }
        assert!(
            start.elapsed() < timeout,
            "operations of {device} still open after {timeout:?}: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes every container labelled for `device`, then its app networks
/// (cleanup for tests whose agent is gone or never existed as an [`Agent`]).
pub fn remove_device_containers(device: &str) {
    remove_device_containers_only(device);
    let out = std::process::Command::new("docker")
        .args([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=io.drover.device={device}"),
        ])
        .output();
    if let Ok(out) = out {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm"])
                .args(&ids)
                .output();
        }
    }
}

fn remove_device_containers_only(device: &str) {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.drover.device={device}"),
        ])
        .output();
    if let Ok(out) = out {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}
