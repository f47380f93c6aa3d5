//! The container runtime: a small trait the reconciler drives, and its
//! Docker implementation on bollard.
//!
//! The trait exists so the reconciler can be unit-tested against a fake; the
//! fake is for unit tests only and never ships.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceMapping, EndpointSettings, HealthConfig,
    HealthStatusEnum, HostConfig, NetworkCreateRequest, NetworkingConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use drover_shared::model::{
    ContainerSpec, Health, HealthCheck, ImageRef, NetworkMode, Protocol, LABEL_APP,
    LABEL_CONTAINER, LABEL_DEVICE, LABEL_GENERATION, LABEL_MANAGED, LABEL_SPEC_HASH,
};
use drover_shared::payload::RegistryCredential;
use drover_shared::{DeviceId, Name, Platform};
use futures_util::StreamExt;
use tokio::sync::Mutex;

use crate::pull::PullErrorClass;

/// Seconds Docker waits after SIGTERM before it kills a container.
const STOP_TIMEOUT_S: i32 = 10;
/// Set on every container that is not privileged.
const NO_NEW_PRIVILEGES: &str = "no-new-privileges:true";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// The daemon could not be reached at all; the next pass retries.
    #[error("docker is not reachable: {0}")]
    Unreachable(String),
    /// Docker or the registry refused; the text is theirs, verbatim.
    #[error("{0}")]
    Docker(String),
    /// A pull failed; the daemon's HTTP status when the pull was refused up
    /// front, `None` when the error came inside the progress stream.
    #[error("{message}")]
    Pull {
        status: Option<u16>,
        message: String,
    },
}

impl RuntimeError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RuntimeError::Unreachable(_))
    }

    /// Whether retrying the pull that failed with this error may help.
    pub fn pull_class(&self) -> PullErrorClass {
        match self {
            RuntimeError::Unreachable(_) => PullErrorClass::Transient,
            RuntimeError::Docker(m) => crate::pull::classify(None, m),
            RuntimeError::Pull { status, message } => crate::pull::classify(*status, message),
        }
    }
}

/// Free space on the file system that holds Docker's data root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpace {
    pub root: PathBuf,
    pub free_bytes: u64,
}

fn docker_error(e: bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError { message, .. } => RuntimeError::Docker(message),
        E::DockerStreamError { error } => RuntimeError::Docker(error),
        // HyperLegacyError is how a refused or dropped connection to the
        // daemon's socket arrives.
        E::HyperResponseError { .. }
        | E::HyperLegacyError { .. }
        | E::IOError { .. }
        | E::RequestTimeoutError
        | E::SocketNotFoundError(_) => RuntimeError::Unreachable(e.to_string()),
        other => RuntimeError::Docker(other.to_string()),
    }
}

/// A container this agent created, as read back from its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub id: String,
    pub app: Name,
    pub container: Name,
    pub spec_hash: String,
    pub generation: u64,
    pub image: String,
    /// Docker's state word: created, running, exited, …
    pub state: String,
    pub exit_code: Option<i64>,
    /// Docker's health status, for a container with a health check (its
    /// spec's or its image's).
    pub health: Option<Health>,
    /// Docker's RestartCount: restarts by its restart policy.
    pub restarts: u32,
    /// Ids of the Docker networks the container is attached to.
    pub networks: Vec<String>,
}

impl ManagedContainer {
    /// `None` for anything this device must not touch: containers without the
    /// managed label, other devices' containers (several agents may share one
    /// daemon), or labels that do not parse.
    pub fn from_labels(
        own: &DeviceId,
        id: &str,
        labels: &HashMap<String, String>,
        image: &str,
        state: &str,
        exit_code: Option<i64>,
    ) -> Option<ManagedContainer> {
        if labels.get(LABEL_MANAGED).map(String::as_str) != Some("true") {
            return None;
        }
        if labels.get(LABEL_DEVICE).map(String::as_str) != Some(own.as_str()) {
            return None;
        }
        // An edge job's container is the job runner's (`jobs.rs`), never
        // the reconciler's, whatever other labels it carries.
        if labels.contains_key(drover_shared::job::LABEL_JOB) {
            return None;
        }
        Some(ManagedContainer {
            id: id.to_string(),
            app: Name::new(labels.get(LABEL_APP)?.as_str()).ok()?,
            container: Name::new(labels.get(LABEL_CONTAINER)?.as_str()).ok()?,
            spec_hash: labels.get(LABEL_SPEC_HASH).cloned().unwrap_or_default(),
            generation: labels
                .get(LABEL_GENERATION)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
            image: image.to_string(),
            state: state.to_string(),
            exit_code,
            health: None,
            restarts: 0,
            networks: Vec::new(),
        })
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "running" | "restarting")
    }
}

/// Docker's container name for one container of one app on one device.
pub fn container_name(device: &DeviceId, app: &Name, container: &Name) -> String {
    format!("drover-{device}-{app}-{container}")
}

/// Docker's name for the network of one app on one device: the app's
/// bridge-mode containers share it and find each other by name on it.
pub fn network_name(device: &DeviceId, app: &Name) -> String {
    format!("drover-{device}-{app}")
}

/// The labels of an app's network: ours, this device's, this app's.
pub fn network_labels(device: &DeviceId, app: &Name) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_DEVICE.to_string(), device.to_string()),
        (LABEL_APP.to_string(), app.to_string()),
    ])
}

/// An app network this agent created, as read back from its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedNetwork {
    pub id: String,
    pub name: String,
    pub app: Name,
}

impl ManagedNetwork {
    /// `None` unless managed and this device's, as for containers.
    pub fn from_labels(
        own: &DeviceId,
        id: &str,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Option<ManagedNetwork> {
        if labels.get(LABEL_MANAGED).map(String::as_str) != Some("true")
            || labels.get(LABEL_DEVICE).map(String::as_str) != Some(own.as_str())
        {
            return None;
        }
        Some(ManagedNetwork {
            id: id.to_string(),
            name: name.to_string(),
            app: Name::new(labels.get(LABEL_APP)?.as_str()).ok()?,
        })
    }
}

/// The labels that make a container ours and let a later pass compare it
/// with the spec without keeping any other record.
pub fn labels_for(
    device: &DeviceId,
    app: &Name,
    spec: &ContainerSpec,
    generation: u64,
) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_DEVICE.to_string(), device.to_string()),
        (LABEL_APP.to_string(), app.to_string()),
        (LABEL_CONTAINER.to_string(), spec.name.to_string()),
        (LABEL_SPEC_HASH.to_string(), spec.fingerprint()),
        (LABEL_GENERATION.to_string(), generation.to_string()),
    ])
}

/// Byte counts summed over all layers of a pull.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullProgress {
    pub current: u64,
    pub total: u64,
}

/// What the reconciler needs from a container runtime.
pub trait Runtime: Send + Sync + 'static {
    /// This device's managed containers, including stopped ones.
    fn list_managed(
        &self,
    ) -> impl Future<Output = Result<Vec<ManagedContainer>, RuntimeError>> + Send;
    fn image_present(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// Pulls with `auth` when given: the credentials for the image's own
    /// registry, never another's.
    fn pull(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryCredential>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Creates the container and returns its id. `network`: the app
    /// network (name or id) a bridge-mode container joins instead of
    /// Docker's default bridge, with its spec name as alias.
    fn create(
        &self,
        name: &str,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
        network: Option<&str>,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// This device's app networks.
    fn list_networks(
        &self,
    ) -> impl Future<Output = Result<Vec<ManagedNetwork>, RuntimeError>> + Send;
    /// Creates a bridge network and returns its id.
    fn create_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Removes a network; already gone is success.
    fn remove_network(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn pause(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn unpause(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops (with the same grace as `stop`) and starts the container again.
    fn restart(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Free space where images are stored; `None` when it cannot be told
    /// (the pull then goes ahead unchecked).
    fn free_disk(&self) -> impl Future<Output = Result<Option<DiskSpace>, RuntimeError>> + Send {
        async { Ok(None) }
    }
    /// Image names and image ids used by any container on the host, managed
    /// or not, running or not.
    fn images_in_use(&self) -> impl Future<Output = Result<HashSet<String>, RuntimeError>> + Send {
        async { Ok(HashSet::new()) }
    }
    /// The image id of a reference; `None` when the image is not present.
    fn image_id(
        &self,
        _image: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send {
        async { Ok(None) }
    }
    /// Removes one image reference without force: Docker refuses when a
    /// container uses it.
    fn remove_image(&self, _image: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        async { Ok(()) }
    }
}

/// The Docker daemon through bollard. Connects lazily and reconnects after a
/// failure, because an unreachable daemon at start is normal on a device that
/// is still booting.
#[derive(Clone)]
pub struct DockerRuntime {
    device: DeviceId,
    docker: Arc<Mutex<Option<Docker>>>,
}

impl DockerRuntime {
    pub fn new(device: DeviceId) -> Self {
        DockerRuntime {
            device,
            docker: Arc::new(Mutex::new(None)),
        }
    }

    /// The connected client. Negotiation is mandatory: bollard speaks a newer
    /// API version by default than many device daemons (Debian's 20.10 is 1.41).
    pub async fn client(&self) -> Result<Docker, RuntimeError> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = Docker::connect_with_local_defaults()
            .map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        let d = d
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        *slot = Some(d.clone());
        Ok(d)
    }

    /// Drops the cached client, so the next call connects and negotiates anew.
    pub async fn forget(&self) {
        *self.docker.lock().await = None;
    }

    /// Forgets the client after an unreachable error so the next call
    /// negotiates again (the daemon may have been upgraded in between).
    async fn check<T>(&self, r: Result<T, bollard::errors::Error>) -> Result<T, RuntimeError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let e = docker_error(e);
                if e.is_unreachable() {
                    *self.docker.lock().await = None;
                }
                Err(e)
            }
        }
    }

    pub async fn version(&self) -> Result<String, RuntimeError> {
        let d = self.client().await?;
        let v = self.check(d.version().await).await?;
        Ok(v.version.unwrap_or_default())
    }

    /// The platform the daemon runs containers for (its `Os` and `Arch`),
    /// which is what a pull must ask for: the agent's own build may differ
    /// (a 32-bit agent on a 64-bit system, an agent under emulation). The
    /// daemon names no ARM variant, so an ARM daemon gets the one this
    /// agent was built for when that is ARM too.
    pub async fn platform(&self) -> Result<Platform, RuntimeError> {
        let d = self.client().await?;
        let v = self.check(d.version().await).await?;
        let arch = v.arch.unwrap_or_default();
        let variant = Platform::of_this_build()
            .filter(|b| arch == "arm" && b.architecture == "arm")
            .and_then(|b| b.variant);
        Ok(Platform::new(&v.os.unwrap_or_default(), &arch, variant.as_deref()).normalize())
    }

    /// `repo:tag` of every tagged image.
    pub async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        let d = self.client().await?;
        let list = self
            .check(
                d.list_images(Some(ListImagesOptionsBuilder::new().build()))
                    .await,
            )
            .await?;
        let mut tags: Vec<String> = list
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t != "<none>:<none>")
            .collect();
        tags.sort();
        tags.dedup();
        Ok(tags)
    }
}

fn summary_state(s: Option<ContainerSummaryStateEnum>) -> String {
    match s {
        Some(ContainerSummaryStateEnum::EMPTY) | None => "unknown".to_string(),
        Some(other) => other.to_string(),
    }
}

/// Docker 1.41's list API has no health field; its status text has:
/// `Up 3 seconds (health: starting)`, `Up 1 minute (healthy)`.
fn health_from_status(status: &str) -> Option<Health> {
    if status.contains("(health: starting)") {
        Some(Health::Starting)
    } else if status.contains("(unhealthy)") {
        Some(Health::Unhealthy)
    } else if status.contains("(healthy)") {
        Some(Health::Healthy)
    } else {
        None
    }
}

/// Docker's health check for a spec's: durations in nanoseconds. Absent
/// fields stay absent, so Docker's defaults (or the image's) apply.
fn health_config(h: &HealthCheck) -> HealthConfig {
    let ns = |ms: Option<u64>| {
        ms.map(|ms| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX))
    };
    HealthConfig {
        test: Some(h.test.clone()),
        interval: ns(h.interval_ms),
        timeout: ns(h.timeout_ms),
        retries: h.retries.map(i64::from),
        start_period: ns(h.start_period_ms),
        start_interval: None,
    }
}

/// Docker's list API has no exit code; its status text has: `Exited (137) 2 minutes ago`,
/// `Restarting (1) 1 second ago`.
fn exit_code_from_status(status: &str) -> Option<i64> {
    let rest = status
        .strip_prefix("Exited (")
        .or_else(|| status.strip_prefix("Restarting ("))?;
    rest.split_once(')')?.0.parse().ok()
}

/// Docker's create request for a spec. Refuses a host path in `volumes`:
/// the orchestrator validates specs, but a desired state can also come from
/// any MQTT client, and a host mount must never slip in unannounced.
fn create_body(
    spec: &ContainerSpec,
    labels: HashMap<String, String>,
    network: Option<&str>,
) -> Result<ContainerCreateBody, RuntimeError> {
    // Only a bridge-mode container joins the app network; host and none
    // keep Docker's meaning.
    let network = network.filter(|_| spec.network_mode == NetworkMode::Bridge);
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let proto = match p.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let key = format!("{}/{proto}", p.container);
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                host_port: Some(p.host.to_string()),
            });
    }
    if let Some(v) = spec.volumes.iter().find(|v| v.source.starts_with('/')) {
        return Err(RuntimeError::Docker(format!(
            "volume source {:?} is a host path; host paths must be listed in host_mounts",
            v.source
        )));
    }
    let bind = |source: &str, target: &str, read_only: bool| {
        if read_only {
            format!("{source}:{target}:ro")
        } else {
            format!("{source}:{target}")
        }
    };
    let binds: Vec<String> = spec
        .volumes
        .iter()
        .map(|v| bind(&v.source, &v.target, v.read_only))
        .chain(
            spec.host_mounts
                .iter()
                .map(|m| bind(&m.source, &m.target, m.read_only)),
        )
        .collect();
    let devices: Vec<DeviceMapping> = spec
        .devices
        .iter()
        .map(|d| DeviceMapping {
            path_on_host: Some(d.host.clone()),
            path_in_container: Some(d.container.clone().unwrap_or_else(|| d.host.clone())),
            cgroup_permissions: Some(d.permissions.clone().unwrap_or_else(|| "rwm".into())),
        })
        .collect();
    let restart = match spec.restart {
        drover_shared::model::RestartPolicy::No => RestartPolicyNameEnum::NO,
        drover_shared::model::RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        drover_shared::model::RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
        drover_shared::model::RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
    };
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.clone(),
        env: (!spec.env.is_empty())
            .then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        healthcheck: spec.healthcheck.as_ref().map(health_config),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            binds: (!binds.is_empty()).then_some(binds),
            restart_policy: Some(RestartPolicy {
                name: Some(restart),
                maximum_retry_count: None,
            }),
            memory: spec
                .memory_mb
                .map(|mb| i64::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX)),
            nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
            privileged: Some(spec.privileged),
            network_mode: Some(
                network.map_or_else(|| spec.network_mode.docker_name().to_string(), String::from),
            ),
            cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
            devices: (!devices.is_empty()).then_some(devices),
            // A privileged container has every capability anyway; for all
            // others, setuid binaries cannot gain more than the process has.
            security_opt: (!spec.privileged).then(|| vec![NO_NEW_PRIVILEGES.to_string()]),
            ..Default::default()
        }),
        networking_config: network.map(|n| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                n.to_string(),
                EndpointSettings {
                    aliases: Some(vec![spec.name.to_string()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    })
}

impl Runtime for DockerRuntime {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let d = self.client().await?;
        // Filter in the daemon too, but decide by our own check: the label
        // filter is an optimisation, `from_labels` is the rule.
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_DEVICE}={}", self.device),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.check(d.list_containers(Some(opts)).await).await?;
        let mut out: Vec<ManagedContainer> = list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let state = summary_state(c.state);
                let exit = c.status.as_deref().and_then(exit_code_from_status);
                let mut m = ManagedContainer::from_labels(
                    &self.device,
                    c.id.as_deref().unwrap_or_default(),
                    &labels,
                    c.image.as_deref().unwrap_or_default(),
                    &state,
                    exit,
                )?;
                m.health = c.status.as_deref().and_then(health_from_status);
                m.networks = c
                    .network_settings
                    .and_then(|n| n.networks)
                    .unwrap_or_default()
                    .into_values()
                    .filter_map(|e| e.network_id.filter(|id| !id.is_empty()))
                    .collect();
                Some(m)
            })
            .collect();
        // The restart count is only in inspect. A container gone since the
        // list keeps 0; the next pass sees it as it is.
        for m in &mut out {
            if let Ok(i) = d.inspect_container(&m.id, None).await {
                m.restarts = i
                    .restart_count
                    .map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX));
                if let Some(h) = i.state.as_ref().and_then(|s| s.health.as_ref()) {
                    m.health = match h.status {
                        Some(HealthStatusEnum::STARTING) => Some(Health::Starting),
                        Some(HealthStatusEnum::HEALTHY) => Some(Health::Healthy),
                        Some(HealthStatusEnum::UNHEALTHY) => Some(Health::Unhealthy),
                        _ => m.health,
                    };
                }
            }
        }
        Ok(out)
    }

    async fn image_present(&self, image: &ImageRef) -> Result<bool, RuntimeError> {
        let d = self.client().await?;
        match d.inspect_image(&image.to_string()).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => self.check(Err(e)).await,
        }
    }

    async fn pull(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryCredential>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        // Always an explicit tag: an empty tag would pull every tag. The
        // daemon's platform, the one the agent reports in `hello` (the
        // build's when the daemon does not say): from a multi-platform
        // image the daemon picks that entry (or an older variant it
        // runs), and refuses an image that has none instead of running
        // one it cannot execute.
        let mut opts = CreateImageOptionsBuilder::new()
            .from_image(&image.repository)
            .tag(image.pull_tag());
        let platform = self.platform().await.ok();
        if let Some(platform) = platform.or_else(Platform::of_this_build) {
            opts = opts.platform(&platform.to_string());
        }
        let opts = opts.build();
        let credentials = auth.map(crate::secrets::docker_credentials);
        let mut stream = d.create_image(Some(opts), None, credentials);
        let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
        while let Some(item) = stream.next().await {
            let info = match item {
                // Refused up front: the status tells what kind of refusal.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                }) => {
                    return Err(RuntimeError::Pull {
                        status: Some(status_code),
                        message,
                    });
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    return Err(RuntimeError::Pull {
                        status: None,
                        message: error,
                    });
                }
                other => self.check(other).await?,
            };
            // Errors also arrive mid-stream, after a 200 response.
            if let Some(err) = info.error_detail.and_then(|e| e.message) {
                return Err(RuntimeError::Pull {
                    status: None,
                    message: err,
                });
            }
            if let (Some(id), Some(p)) = (info.id, info.progress_detail) {
                let current = p.current.and_then(|c| u64::try_from(c).ok()).unwrap_or(0);
                let total = p.total.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
                let entry = layers.entry(id).or_default();
                if total > 0 {
                    *entry = (current.min(total), total);
                    let (c, t) = layers
                        .values()
                        .fold((0, 0), |(c, t), (lc, lt)| (c + lc, t + lt));
                    progress(PullProgress {
                        current: c,
                        total: t,
                    });
                }
            }
        }
        Ok(())
    }

    async fn create(
        &self,
        name: &str,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
        network: Option<&str>,
    ) -> Result<String, RuntimeError> {
        let d = self.client().await?;
        let opts = CreateContainerOptionsBuilder::new().name(name).build();
        let r = self
            .check(
                d.create_container(Some(opts), create_body(spec, labels, network)?)
                    .await,
            )
            .await?;
        Ok(r.id)
    }

    async fn list_networks(&self) -> Result<Vec<ManagedNetwork>, RuntimeError> {
        let d = self.client().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_DEVICE}={}", self.device),
            ],
        )]);
        let opts = ListNetworksOptionsBuilder::new().filters(&filters).build();
        let list = self.check(d.list_networks(Some(opts)).await).await?;
        let mut out: Vec<ManagedNetwork> = list
            .into_iter()
            .filter_map(|n| {
                ManagedNetwork::from_labels(
                    &self.device,
                    n.id.as_deref()?,
                    n.name.as_deref()?,
                    &n.labels.unwrap_or_default(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn create_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, RuntimeError> {
        let d = self.client().await?;
        let req = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".to_string()),
            labels: Some(labels),
            ..Default::default()
        };
        let r = self.check(d.create_network(req).await).await?;
        Ok(r.id)
    }

    async fn remove_network(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        match d.remove_network(id).await {
            // 404: already gone.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            r => self.check(r).await,
        }
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        self.check(d.pause_container(id).await).await
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        self.check(d.unpause_container(id).await).await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        match d.start_container(id, None).await {
            // 304: already running, which is what we wanted.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            r => self.check(r).await,
        }
    }

    async fn restart(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        let opts = RestartContainerOptionsBuilder::new()
            .t(STOP_TIMEOUT_S)
            .build();
        self.check(d.restart_container(id, Some(opts)).await).await
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        let opts = StopContainerOptionsBuilder::new().t(STOP_TIMEOUT_S).build();
        match d.stop_container(id, Some(opts)).await {
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            r => self.check(r).await,
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match d.remove_container(id, Some(opts)).await {
            // 404: already gone.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            r => self.check(r).await,
        }
    }

    async fn free_disk(&self) -> Result<Option<DiskSpace>, RuntimeError> {
        let Some(root) = self.root_dir().await? else {
            return Ok(None);
        };
        let at = root.clone();
        let free = tokio::task::spawn_blocking(move || free_bytes_at(&at))
            .await
            .ok()
            .flatten();
        Ok(free.map(|free_bytes| DiskSpace { root, free_bytes }))
    }

    async fn images_in_use(&self) -> Result<HashSet<String>, RuntimeError> {
        let d = self.client().await?;
        let opts = ListContainersOptionsBuilder::new().all(true).build();
        let list = self.check(d.list_containers(Some(opts)).await).await?;
        Ok(list
            .into_iter()
            .flat_map(|c| [c.image, c.image_id])
            .flatten()
            .collect())
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        let d = self.client().await?;
        match d.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => self.check(Err(e)).await,
        }
    }

    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        let d = self.client().await?;
        let opts = RemoveImageOptionsBuilder::new()
            .force(false)
            .noprune(false)
            .build();
        let r = d.remove_image(image, Some(opts), None).await.map(|_| ());
        self.check(r).await
    }
}

impl DockerRuntime {
    /// Docker's data root as the daemon reports it (`docker info`).
    async fn root_dir(&self) -> Result<Option<PathBuf>, RuntimeError> {
        let d = self.client().await?;
        let info = self.check(d.info().await).await?;
        Ok(info
            .docker_root_dir
            .filter(|r| !r.is_empty())
            .map(PathBuf::from))
    }
}

/// Free bytes on the mount that holds `path`. Blocking (reads the mount table).
fn free_bytes_at(path: &std::path::Path) -> Option<u64> {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let mounts: Vec<PathBuf> = disks
        .list()
        .iter()
        .map(|d| d.mount_point().to_path_buf())
        .collect();
    let i = crate::pull::containing_mount(path, &mounts)?;
    Some(disks.list()[i].available_space())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_from_the_status_text() {
        assert_eq!(
            exit_code_from_status("Exited (137) 2 minutes ago"),
            Some(137)
        );
        assert_eq!(exit_code_from_status("Up 3 seconds"), None);
    }

    fn plain(image: &str) -> ContainerSpec {
        ContainerSpec {
            name: Name::new("main").expect("valid"),
            image: image.into(),
            command: None,
            env: Default::default(),
            ports: vec![],
            volumes: vec![],
            restart: Default::default(),
            memory_mb: None,
            cpus: None,
            privileged: false,
            network_mode: Default::default(),
            cap_add: vec![],
            devices: vec![],
            host_mounts: vec![],
            healthcheck: None,
            depends_on: vec![],
        }
    }

    #[test]
    fn a_default_spec_is_created_unprivileged() {
        let body = create_body(&plain("x:1"), HashMap::new(), None).expect("body");
        let hc = body.host_config.expect("host config");
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.network_mode.as_deref(), Some("bridge"));
        assert_eq!(hc.security_opt, Some(vec![NO_NEW_PRIVILEGES.to_string()]));
        assert_eq!((hc.binds, hc.cap_add, hc.devices), (None, None, None));
    }

    #[test]
    fn a_bridge_container_joins_the_app_network_under_its_name() {
        let body = create_body(&plain("x:1"), HashMap::new(), Some("drover-d-web")).expect("body");
        assert_eq!(
            body.host_config.and_then(|h| h.network_mode).as_deref(),
            Some("drover-d-web")
        );
        let endpoints = body
            .networking_config
            .and_then(|n| n.endpoints_config)
            .expect("endpoints");
        assert_eq!(
            endpoints
                .get("drover-d-web")
                .and_then(|e| e.aliases.clone()),
            Some(vec!["main".to_string()])
        );
        // Host and none keep their meaning: no app network.
        let mut host = plain("x:1");
        host.network_mode = drover_shared::model::NetworkMode::Host;
        let body = create_body(&host, HashMap::new(), Some("drover-d-web")).expect("body");
        assert_eq!(
            body.host_config.and_then(|h| h.network_mode).as_deref(),
            Some("host")
        );
        assert_eq!(body.networking_config, None);
    }

    #[test]
    fn privileges_asked_for_map_onto_the_host_config() {
        use drover_shared::model::{DeviceMapping as Dev, HostMount, NetworkMode, VolumeBind};
        let mut spec = plain("x:1");
        spec.privileged = true;
        spec.network_mode = NetworkMode::Host;
        spec.cap_add = vec!["NET_ADMIN".into()];
        spec.devices = vec![Dev {
            host: "/dev/ttyUSB0".into(),
            container: None,
            permissions: Some("rw".into()),
        }];
        spec.volumes = vec![VolumeBind {
            source: "cache".into(),
            target: "/cache".into(),
            read_only: false,
        }];
        spec.host_mounts = vec![HostMount {
            source: "/srv/data".into(),
            target: "/data".into(),
            read_only: true,
        }];
        let hc = create_body(&spec, HashMap::new(), None)
            .expect("body")
            .host_config
            .expect("host config");
        assert_eq!(hc.privileged, Some(true));
        assert_eq!(hc.network_mode.as_deref(), Some("host"));
        assert_eq!(hc.security_opt, None);
        assert_eq!(hc.cap_add, Some(vec!["NET_ADMIN".to_string()]));
        assert_eq!(
            hc.binds,
            Some(vec![
                "cache:/cache".to_string(),
                "/srv/data:/data:ro".to_string()
            ])
        );
        let d = &hc.devices.expect("devices")[0];
        assert_eq!(
            (
                d.path_on_host.as_deref(),
                d.path_in_container.as_deref(),
                d.cgroup_permissions.as_deref()
            ),
            (Some("/dev/ttyUSB0"), Some("/dev/ttyUSB0"), Some("rw"))
        );
    }

    #[test]
    fn a_host_path_smuggled_into_volumes_is_refused() {
        let mut spec = plain("x:1");
        spec.volumes = vec![drover_shared::model::VolumeBind {
            source: "/etc".into(),
            target: "/host-etc".into(),
            read_only: false,
        }];
        let e = create_body(&spec, HashMap::new(), None).expect_err("refused");
        assert!(e.to_string().contains("host_mounts"), "{e}");
    }

    #[test]
    fn only_own_managed_containers_are_read() {
        let me = DeviceId::new("me").expect("valid");
        let spec: ContainerSpec = ContainerSpec {
            name: Name::new("main").expect("valid"),
            image: "x:1".into(),
            command: None,
            env: Default::default(),
            ports: vec![],
            volumes: vec![],
            restart: Default::default(),
            memory_mb: None,
            cpus: None,
            privileged: false,
            network_mode: Default::default(),
            cap_add: vec![],
            devices: vec![],
            host_mounts: vec![],
            healthcheck: None,
            depends_on: vec![],
        };
        let app = Name::new("web").expect("valid");
        let ours = labels_for(&me, &app, &spec, 3);
        let got =
            ManagedContainer::from_labels(&me, "id1", &ours, "x:1", "running", None).expect("ours");
        assert_eq!(
            (got.generation, got.spec_hash.as_str()),
            (3, spec.fingerprint().as_str())
        );

        let other = DeviceId::new("other").expect("valid");
        let theirs = labels_for(&other, &app, &spec, 3);
        assert_eq!(
            ManagedContainer::from_labels(&me, "id2", &theirs, "x:1", "running", None),
            None
        );

        let mut unmanaged = ours.clone();
        unmanaged.remove(LABEL_MANAGED);
        assert_eq!(
            ManagedContainer::from_labels(&me, "id3", &unmanaged, "x:1", "running", None),
            None
        );
        assert_eq!(
            ManagedContainer::from_labels(&me, "id4", &HashMap::new(), "x:1", "running", None),
            None
        );
        // A job's container, even one that also carried app labels, is
        // left to the job runner: the reconciler never stops or removes it.
        let mut job = ours.clone();
        job.insert(drover_shared::job::LABEL_JOB.into(), "j1".into());
        assert_eq!(
            ManagedContainer::from_labels(&me, "id5", &job, "x:1", "running", None),
            None
        );
    }
}
