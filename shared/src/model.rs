//! The app model and the device state that travels inside payloads and the
//! REST API alike.
//!
//! An app is a named set of containers. The model leaves room for releases,
//! labels and rollouts (`labels` on apps, `generation` on desired state)
//! without reshaping what exists.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::Name;

/// Container label keys the agent puts on every container it creates.
/// A container without `LABEL_MANAGED` is never touched.
pub const LABEL_MANAGED: &str = "io.drover.managed";
pub const LABEL_DEVICE: &str = "io.drover.device";
pub const LABEL_APP: &str = "io.drover.app";
pub const LABEL_CONTAINER: &str = "io.drover.container";
pub const LABEL_SPEC_HASH: &str = "io.drover.spec-hash";
pub const LABEL_GENERATION: &str = "io.drover.generation";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: Name,
    pub containers: Vec<ContainerSpec>,
    /// Free-form labels for selection and display; not interpreted yet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: Name,
    /// `registry/repo:tag` or `registry/repo@sha256:…`. A reference with
    /// neither gets `:latest` at validation, so a pull never fetches every tag.
    pub image: String,
    /// Overrides the image's CMD when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Named Docker volumes only; host paths go in `host_mounts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeBind>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU limit in cores (0.5 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    // What the container may do to its host. Everything below is off by
    // default and spelled out when on; `AppSpec::privileges` lists it. The
    // defaults are skipped when serialising, so a spec that asks for none of
    // it keeps the fingerprint it had before these fields existed.
    /// Docker's `--privileged`: every capability and every host device.
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    #[serde(default, skip_serializing_if = "NetworkMode::is_default")]
    pub network_mode: NetworkMode,
    /// Linux capabilities added to Docker's default set, e.g. `NET_ADMIN`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Host devices made available inside the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceMapping>,
    /// Host directories or files bind-mounted into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_mounts: Vec<HostMount>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The container's network: Docker's default bridge, the host's own
/// network stack, or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Bridge,
    Host,
    None,
}

impl NetworkMode {
    fn is_default(&self) -> bool {
        *self == NetworkMode::Bridge
    }

    pub fn docker_name(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
        }
    }
}

/// A host device given to the container (`docker run --device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    /// Absolute path of the device on the host, e.g. `/dev/ttyUSB0`.
    pub host: String,
    /// Path inside the container; the host path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// cgroup permissions, some of `r`, `w` and `m`; `rwm` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

/// A host path bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMount {
    /// Absolute path on the host.
    pub source: String,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Linux capabilities `cap_add` accepts (capabilities(7), without `CAP_`).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Host address to bind; all addresses when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeBind {
    /// A named Docker volume; never a host path (see [`HostMount`]).
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    #[default]
    UnlessStopped,
    Always,
    OnFailure,
}

impl RestartPolicy {
    pub fn docker_name(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::UnlessStopped => "unless-stopped",
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
}

/// A validation failure that names the offending field by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl AppSpec {
    /// Checks everything serde cannot: non-empty, unique names, a usable
    /// image reference, sane ports and limits. Normalises image references
    /// without tag or digest to `:latest`.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        if self.containers.is_empty() {
            return Err(FieldError::new(
                "containers",
                "an app needs at least one container",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.containers.iter_mut().enumerate() {
            let at = |f: &str| format!("containers[{i}].{f}");
            if !seen.insert(c.name.clone()) {
                return Err(FieldError::new(
                    at("name"),
                    format!("duplicate container name {:?}", c.name.as_str()),
                ));
            }
            let image = ImageRef::parse(&c.image).map_err(|m| FieldError::new(at("image"), m))?;
            c.image = image.to_string();
            if let Some(cmd) = &c.command {
                if cmd.is_empty() {
                    return Err(FieldError::new(
                        at("command"),
                        "must not be an empty list; omit it to use the image's command",
                    ));
                }
            }
            for k in c.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(FieldError::new(
                        at("env"),
                        format!("invalid variable name {k:?}"),
                    ));
                }
            }
            for (j, p) in c.ports.iter().enumerate() {
                if p.host == 0 || p.container == 0 {
                    return Err(FieldError::new(
                        format!("containers[{i}].ports[{j}]"),
                        "ports must be between 1 and 65535",
                    ));
                }
                if let Some(ip) = &p.host_ip {
                    if ip.parse::<std::net::IpAddr>().is_err() {
                        return Err(FieldError::new(
                            format!("containers[{i}].ports[{j}].host_ip"),
                            format!("{ip:?} is not an IP address"),
                        ));
                    }
                }
            }
            for (j, v) in c.volumes.iter().enumerate() {
                let f = |x: &str| format!("containers[{i}].volumes[{j}].{x}");
                if v.source.starts_with('/') {
                    return Err(FieldError::new(
                        f("source"),
                        format!(
                            "{:?} is a host path; volumes take named volumes only, put host paths in host_mounts",
                            v.source
                        ),
                    ));
                }
                if !is_volume_name(&v.source) {
                    return Err(FieldError::new(
                        f("source"),
                        "must be a volume name: letters, digits, '_', '.' or '-', starting with a letter or digit",
                    ));
                }
                check_container_path(&v.target).map_err(|m| FieldError::new(f("target"), m))?;
            }
            for (j, m) in c.host_mounts.iter().enumerate() {
                let f = |x: &str| format!("containers[{i}].host_mounts[{j}].{x}");
                check_host_path(&m.source).map_err(|e| FieldError::new(f("source"), e))?;
                check_container_path(&m.target).map_err(|e| FieldError::new(f("target"), e))?;
            }
            for (j, d) in c.devices.iter().enumerate() {
                let f = |x: &str| format!("containers[{i}].devices[{j}].{x}");
                check_host_path(&d.host).map_err(|e| FieldError::new(f("host"), e))?;
                if let Some(t) = &d.container {
                    check_container_path(t).map_err(|e| FieldError::new(f("container"), e))?;
                }
                if let Some(p) = &d.permissions {
                    let mut seen = std::collections::BTreeSet::new();
                    if p.is_empty() || !p.chars().all(|ch| "rwm".contains(ch) && seen.insert(ch)) {
                        return Err(FieldError::new(
                            f("permissions"),
                            format!("{p:?} is not some of r, w and m (e.g. \"rw\")"),
                        ));
                    }
                }
            }
            for (j, cap) in c.cap_add.iter().enumerate() {
                if !CAPABILITIES.contains(&cap.as_str()) {
                    let hint = match cap.to_ascii_uppercase().trim_start_matches("CAP_") {
                        u if CAPABILITIES.contains(&u) => format!("; write it as {u:?}"),
                        "ALL" => "; ask for privileged instead".to_string(),
                        _ => String::new(),
                    };
                    return Err(FieldError::new(
                        format!("containers[{i}].cap_add[{j}]"),
                        format!("{cap:?} is not a Linux capability name{hint}"),
                    ));
                }
            }
            if c.network_mode != NetworkMode::Bridge && !c.ports.is_empty() {
                return Err(FieldError::new(
                    at("ports"),
                    format!(
                        "ports cannot be published with network_mode {}",
                        c.network_mode.docker_name()
                    ),
                ));
            }
            if c.memory_mb == Some(0) {
                return Err(FieldError::new(at("memory_mb"), "must be greater than 0"));
            }
            if let Some(cpus) = c.cpus {
                if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
                    return Err(FieldError::new(
                        at("cpus"),
                        "must be a number of cores greater than 0",
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the app may do to the device it runs on, beyond an ordinary
    /// unprivileged container: `privileged`, `host-network`,
    /// `host-mount:<path>`, `device:<path>`, `cap:<NAME>`. Empty when the
    /// app is unprivileged. Each entry appears once, in container order.
    pub fn privileges(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |p: String| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        for c in &self.containers {
            if c.privileged {
                add("privileged".into());
            }
            if c.network_mode == NetworkMode::Host {
                add("host-network".into());
            }
            for m in &c.host_mounts {
                add(format!("host-mount:{}", m.source));
            }
            for d in &c.devices {
                add(format!("device:{}", d.host));
            }
            for cap in &c.cap_add {
                add(format!("cap:{cap}"));
            }
        }
        out
    }
}

/// Docker's rule for volume names.
fn is_volume_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && s.len() <= 255
}

fn check_container_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(':') || p.contains('\0') {
        return Err("must be an absolute path inside the container, without ':'".into());
    }
    Ok(())
}

fn check_host_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(':') || p.contains('\0') {
        return Err("must be an absolute host path, without ':'".into());
    }
    if p.split('/').any(|part| part == "..") {
        return Err("must not contain '..'".into());
    }
    Ok(())
}

impl ContainerSpec {
    /// A stable fingerprint of the spec. The agent stores it as a label; a
    /// different fingerprint means the container must be recreated.
    pub fn fingerprint(&self) -> String {
        // FNV-1a over the canonical CBOR encoding: maps are BTreeMaps, so
        // the encoding is deterministic.
        let mut bytes = Vec::new();
        if ciborium::into_writer(self, &mut bytes).is_err() {
            return String::from("0");
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// An image reference split the way the Docker pull API wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 512 {
            return Err("is longer than 512 characters".into());
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("contains {c:?}"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let ok = d.split_once(':').is_some_and(|(alg, hex)| {
                    !alg.is_empty() && !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
                });
                if !ok {
                    return Err(format!("digest {d:?} is not of the form algorithm:hex"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                let tag = &rest[i + 1..];
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                {
                    return Err(format!("tag {tag:?} is not a valid tag"));
                }
                (&rest[..i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if repository.is_empty()
            || repository.starts_with('/')
            || repository.ends_with('/')
            || repository.contains("//")
        {
            return Err(format!("repository {repository:?} is not valid"));
        }
        let path_ok = |c: char| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
        };
        // The first component may be a registry host with upper case and a port.
        let path = match repository.split_once('/') {
            Some((host, p)) if host.contains('.') || host.contains(':') || host == "localhost" => p,
            _ => repository,
        };
        if let Some(c) = path.chars().find(|c| !path_ok(*c)) {
            return Err(format!(
                "repository {repository:?} contains {c:?} (repository names are lower case)"
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        let image = ImageRef {
            repository: repository.to_string(),
            tag,
            digest,
        };
        // The limit holds for the normal form too: `AppSpec::validate` stores
        // it and the agent parses it again before pulling, so a reference
        // that only fits without `:latest` must be refused here, not there.
        if image.to_string().len() > 512 {
            return Err("is longer than 512 characters once `:latest` is added".into());
        }
        Ok(image)
    }

    /// The registry the image is pulled from, Docker's way: the first path
    /// component when it looks like a host (has a `.` or a `:`, or is
    /// `localhost`), else Docker Hub, `docker.io`. Lower case.
    pub fn registry_host(&self) -> String {
        match self.repository.split_once('/') {
            Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => {
                host.to_ascii_lowercase()
            }
            _ => "docker.io".to_string(),
        }
    }

    /// What to pass as the `tag` of a pull: the digest when pinned, else the tag.
    pub fn pull_tag(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Whether an app deployed on a device should be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Stopped,
}

/// Everything one device should run. Written only by the orchestrator;
/// `generation` grows by one on every change.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    pub generation: u64,
    pub apps: Vec<DesiredApp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredApp {
    pub spec: AppSpec,
    pub run: RunState,
    /// The generation of the last deploy or start of this app. A value the
    /// device has not acted on yet means "run it now", even where the
    /// restart policy would leave an exited container alone; carried in the
    /// state, not the command, so it holds whichever message arrives first.
    #[serde(default)]
    pub started_at: u64,
}

impl DesiredState {
    pub fn app(&self, name: &Name) -> Option<&DesiredApp> {
        self.apps.iter().find(|a| &a.spec.name == name)
    }
}

/// Where an app is on a device, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppPhase {
    Pending,
    Pulling,
    /// A pull failed for a reason that may pass (registry unreachable, 5xx,
    /// not enough disk); the agent retries with backoff. See `error`,
    /// `attempts` and `next_retry_at_ms`.
    Retrying,
    Starting,
    Running,
    Stopped,
    Failed,
}

/// What runs on a device. Written only by the agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ObservedState {
    /// The highest desired generation the agent has fully applied.
    pub applied_generation: u64,
    /// The highest desired generation the agent has received.
    pub desired_generation: u64,
    pub apps: Vec<AppStatus>,
    /// Set while the agent cannot write its state directory (read-only,
    /// full): it runs on the desired state it holds in memory, and a
    /// restart would only find an older one. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_error: Option<String>,
    /// Set while the agent cannot reach the Docker daemon: nothing it
    /// reports about containers is current. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: Name,
    pub phase: AppPhase,
    /// Docker's or the registry's own error text when `phase` is failed or
    /// retrying: the last error seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed attempts so far at the current generation (retrying phase).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at_ms: Option<u64>,
    pub containers: Vec<ContainerStatus>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: Name,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Docker's state word: created, running, exited, … or `absent`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observed_state_from_an_older_agent_still_decodes() {
        let old = serde_json::json!({"applied_generation": 3, "desired_generation": 4, "apps": []});
        let o: ObservedState = serde_json::from_value(old).expect("decodes");
        assert_eq!((o.storage_error, o.docker_error), (None, None));
        // And a healthy report looks exactly as it did.
        let back = serde_json::to_value(ObservedState::default()).expect("encodes");
        assert_eq!(
            back,
            serde_json::json!({"applied_generation": 0, "desired_generation": 0, "apps": []})
        );
    }

    fn spec(image: &str) -> AppSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web",
            "containers": [{"name": "main", "image": image}]
        }))
        .expect("valid json")
    }

    #[test]
    fn image_without_tag_gets_latest() {
        let mut s = spec("127.0.0.1:5000/demo/hello");
        s.validate().expect("valid");
        assert_eq!(s.containers[0].image, "127.0.0.1:5000/demo/hello:latest");
    }

    #[test]
    fn image_references_parse() {
        let r = ImageRef::parse("localhost:5000/a/b:1.2").expect("ok");
        assert_eq!(
            (r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000/a/b", Some("1.2"))
        );
        let d = ImageRef::parse("busybox@sha256:abcdef").expect("ok");
        assert_eq!(d.pull_tag(), "sha256:abcdef");
        assert!(ImageRef::parse("Busybox:1").is_err());
        assert!(ImageRef::parse("busybox:").is_err());
        assert!(ImageRef::parse("bad image").is_err());
        assert!(ImageRef::parse("busybox@nothex").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec("busybox:1");
        s.containers[0].memory_mb = Some(0);
        assert_eq!(
            s.validate().expect_err("invalid").field,
            "containers[0].memory_mb"
        );
        let mut s = spec("busybox:1");
        s.containers.push(s.containers[0].clone());
        assert_eq!(
            s.validate().expect_err("invalid").field,
            "containers[1].name"
        );
        let mut s = spec("busybox:1");
        s.containers.clear();
        assert_eq!(s.validate().expect_err("invalid").field, "containers");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<AppSpec, _> = serde_json::from_value(serde_json::json!({
            "name": "web", "containers": [], "imagee": "x"
        }));
        assert!(r.is_err());
    }

    #[test]
    fn normal_form_of_a_valid_image_parses_again() {
        // Found by fuzz/ (app_spec): a 510-character reference without a tag
        // passed validation and became 517 characters with `:latest`, which
        // the agent's own ImageRef::parse then refused on every reconcile.
        let mut s = spec(&"a".repeat(510));
        assert_eq!(
            s.validate().expect_err("too long once normalised").field,
            "containers[0].image"
        );
        let longest = "a".repeat(512 - ":latest".len());
        let mut s = spec(&longest);
        s.validate().expect("fits with :latest");
        assert_eq!(s.containers[0].image, format!("{longest}:latest"));
        let r = ImageRef::parse(&s.containers[0].image).expect("normal form parses");
        assert_eq!(r.to_string(), s.containers[0].image);
        // Explicit tags and digests were already bounded by the raw length.
        assert!(ImageRef::parse(&format!("{}:1", "a".repeat(510))).is_ok());
    }

    #[test]
    fn registry_hosts_follow_docker() {
        let host = |s: &str| ImageRef::parse(s).expect("valid").registry_host();
        assert_eq!(host("127.0.0.1:5001/drover/busybox:2"), "127.0.0.1:5001");
        assert_eq!(
            host("Registry.Example.com/a/b@sha256:ab"),
            "registry.example.com"
        );
        assert_eq!(host("localhost/a:1"), "localhost");
        assert_eq!(host("busybox:1"), "docker.io");
        assert_eq!(host("library/busybox"), "docker.io");
    }

    fn with(f: impl FnOnce(&mut ContainerSpec)) -> AppSpec {
        let mut s = spec("busybox:1");
        f(&mut s.containers[0]);
        s
    }

    fn invalid_field(mut s: AppSpec) -> (String, String) {
        let e = s.validate().expect_err("invalid");
        (e.field, e.message)
    }

    #[test]
    fn specs_are_unprivileged_unless_they_ask() {
        let s: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "containers": [{"name": "main", "image": "busybox:1",
                            "volumes": [{"source": "data", "target": "/data"}]}]
        }))
        .expect("valid json");
        let c = &s.containers[0];
        assert!(!c.privileged);
        assert_eq!(c.network_mode, NetworkMode::Bridge);
        assert!(c.cap_add.is_empty() && c.devices.is_empty() && c.host_mounts.is_empty());
        assert!(s.privileges().is_empty(), "{:?}", s.privileges());
        let mut s = s;
        s.validate().expect("a named volume is fine");
    }

    #[test]
    fn privileges_list_everything_asked_for_once() {
        let mut s: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "tool",
            "containers": [
                {"name": "a", "image": "busybox:1", "privileged": true, "network_mode": "host",
                 "host_mounts": [{"source": "/data", "target": "/data"}],
                 "devices": [{"host": "/dev/ttyUSB0"}],
                 "cap_add": ["NET_ADMIN"]},
                {"name": "b", "image": "busybox:1", "network_mode": "none",
                 "host_mounts": [{"source": "/data", "target": "/other", "read_only": true}],
                 "cap_add": ["SYS_TIME"]}
            ]
        }))
        .expect("valid json");
        s.validate().expect("valid");
        assert_eq!(
            s.privileges(),
            [
                "privileged",
                "host-network",
                "host-mount:/data",
                "device:/dev/ttyUSB0",
                "cap:NET_ADMIN",
                "cap:SYS_TIME"
            ]
        );
    }

    #[test]
    fn a_host_path_in_volumes_points_to_host_mounts() {
        let (field, msg) = invalid_field(with(|c| {
            c.volumes.push(VolumeBind {
                source: "/var/data".into(),
                target: "/data".into(),
                read_only: false,
            })
        }));
        assert_eq!(field, "containers[0].volumes[0].source");
        assert!(msg.contains("host_mounts"), "{msg}");
        for bad in ["./data", "", "a:b", "-x"] {
            let (field, _) = invalid_field(with(|c| {
                c.volumes.push(VolumeBind {
                    source: bad.into(),
                    target: "/data".into(),
                    read_only: false,
                })
            }));
            assert_eq!(field, "containers[0].volumes[0].source", "{bad:?}");
        }
    }

    #[test]
    fn privilege_fields_are_validated_by_name() {
        let mount = |source: &str, target: &str| HostMount {
            source: source.into(),
            target: target.into(),
            read_only: false,
        };
        let cases: Vec<(AppSpec, &str)> = vec![
            (
                with(|c| c.host_mounts.push(mount("data", "/data"))),
                "containers[0].host_mounts[0].source",
            ),
            (
                with(|c| c.host_mounts.push(mount("/srv/../etc", "/data"))),
                "containers[0].host_mounts[0].source",
            ),
            (
                with(|c| c.host_mounts.push(mount("/srv", "data"))),
                "containers[0].host_mounts[0].target",
            ),
            (
                with(|c| c.cap_add.push("net_admin".into())),
                "containers[0].cap_add[0]",
            ),
            (
                with(|c| c.cap_add.push("ALL".into())),
                "containers[0].cap_add[0]",
            ),
            (
                with(|c| {
                    c.devices.push(DeviceMapping {
                        host: "ttyUSB0".into(),
                        container: None,
                        permissions: None,
                    })
                }),
                "containers[0].devices[0].host",
            ),
            (
                with(|c| {
                    c.devices.push(DeviceMapping {
                        host: "/dev/ttyUSB0".into(),
                        container: None,
                        permissions: Some("rx".into()),
                    })
                }),
                "containers[0].devices[0].permissions",
            ),
            (
                with(|c| {
                    c.network_mode = NetworkMode::Host;
                    c.ports.push(PortMapping {
                        host: 80,
                        container: 80,
                        protocol: Protocol::Tcp,
                        host_ip: None,
                    });
                }),
                "containers[0].ports",
            ),
        ];
        for (s, want) in cases {
            let (field, msg) = invalid_field(s);
            assert_eq!(field, want, "{msg}");
        }
        let (_, msg) = invalid_field(with(|c| c.cap_add.push("cap_net_admin".into())));
        assert!(msg.contains("\"NET_ADMIN\""), "{msg}");
        let r: Result<AppSpec, _> = serde_json::from_value(serde_json::json!({
            "name": "web", "containers": [{"name": "main", "image": "busybox:1", "network_mode": "macvlan"}]
        }));
        assert!(r.is_err(), "unknown network modes are rejected");
    }

    #[test]
    fn privilege_fields_are_in_the_fingerprint_and_defaults_keep_it() {
        let base = spec("busybox:1").containers[0].clone();
        // The fingerprint of a plain spec from before these fields existed.
        #[derive(Serialize)]
        struct Before {
            name: &'static str,
            image: &'static str,
            restart: &'static str,
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &Before {
                name: "main",
                image: "busybox:1",
                restart: "unless-stopped",
            },
            &mut bytes,
        )
        .expect("encode");
        let mut cbor_of_old = Vec::new();
        ciborium::into_writer(&base, &mut cbor_of_old).expect("encode");
        assert_eq!(bytes, cbor_of_old, "defaults are not serialised");
        type Change = Box<dyn Fn(&mut ContainerSpec)>;
        let changes: Vec<Change> = vec![
            Box::new(|c| c.privileged = true),
            Box::new(|c| c.network_mode = NetworkMode::Host),
            Box::new(|c| c.network_mode = NetworkMode::None),
            Box::new(|c| c.cap_add.push("NET_ADMIN".into())),
            Box::new(|c| {
                c.devices.push(DeviceMapping {
                    host: "/dev/null".into(),
                    container: None,
                    permissions: None,
                })
            }),
            Box::new(|c| {
                c.host_mounts.push(HostMount {
                    source: "/srv".into(),
                    target: "/srv".into(),
                    read_only: true,
                })
            }),
        ];
        for change in changes {
            let mut c = base.clone();
            change(&mut c);
            assert_ne!(c.fingerprint(), base.fingerprint(), "{c:?}");
        }
    }

    #[test]
    fn fingerprint_changes_with_the_spec() {
        let a = spec("busybox:1").containers[0].clone();
        let mut b = a.clone();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.env.insert("X".into(), "1".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
