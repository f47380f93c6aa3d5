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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: Name,
    pub containers: Vec<ContainerSpec>,
    /// Free-form labels for selection and display; not interpreted yet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// How Docker tells whether the container works. Absent: the image's
    /// own HEALTHCHECK, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    /// Containers of the same app that must be running (and healthy, where
    /// they have a health check) before this one starts, as Compose's
    /// `depends_on`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<Name>,
}

/// A container health check, as Docker's `HEALTHCHECK` and Compose's
/// `healthcheck`. Durations in milliseconds; absent ones take Docker's
/// defaults (30 s interval, 30 s timeout, 3 retries, no start period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Docker's form: `["CMD", "prog", "arg", …]`, `["CMD-SHELL", "cmd"]`,
    /// or `["NONE"]` to turn off the image's own check.
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period_ms: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The container's network: Docker's default bridge, the host's own
/// network stack, or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeBind {
    /// A named Docker volume; never a host path (see [`HostMount`]).
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Bounds on an app spec. A device's desired state carries the whole spec
/// of every app on it, in one MQTT message of at most
/// [`MAX_PAYLOAD_BYTES`](crate::codec::MAX_PAYLOAD_BYTES); these keep one
/// app well inside that, and each field inside what Docker and the kernel
/// take (one argument or `NAME=value` string of an `execve` is at most
/// 128 KiB).
pub mod limits {
    /// The CBOR-encoded spec: half a message, so one app of any size that
    /// validates always fits on a device that runs nothing else.
    pub const APP_SPEC_BYTES: usize = 128 * 1024;
    pub const CONTAINERS: usize = 32;
    pub const ENV_VARS: usize = 512;
    pub const ENV_NAME_BYTES: usize = 256;
    pub const ENV_VALUE_BYTES: usize = 32 * 1024;
    pub const COMMAND_ARGS: usize = 512;
    pub const COMMAND_ARG_BYTES: usize = 32 * 1024;
    pub const LABELS: usize = 64;
    pub const LABEL_KEY_BYTES: usize = 128;
    pub const LABEL_VALUE_BYTES: usize = 512;
    pub const PORTS: usize = 1024;
    /// Volumes, host mounts and devices, each.
    pub const MOUNTS: usize = 128;
    /// Linux's `PATH_MAX`.
    pub const PATH_BYTES: usize = 4096;
    /// Docker refuses a memory limit below 6 MiB.
    pub const MIN_MEMORY_MB: u64 = 6;
    /// 1 TiB: far above any device Drover runs on, far below where the
    /// byte count Docker is given overflows.
    pub const MAX_MEMORY_MB: u64 = 1024 * 1024;
    /// Docker refuses fewer than 0.01 cores.
    pub const MIN_CPUS: f64 = 0.01;
    pub const MAX_CPUS: f64 = 1024.0;
}

impl AppSpec {
    /// Checks everything serde cannot: non-empty, unique names, a usable
    /// image reference, sane ports, paths and limits, and the size bounds
    /// in [`limits`]. Normalises image references without tag or digest to
    /// `:latest`. Only what holds on any device is checked here; what
    /// depends on the other apps of a device (host ports, the size of the
    /// whole desired state) is checked when deploying.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        if self.containers.is_empty() {
            return Err(FieldError::new(
                "containers",
                "an app needs at least one container",
            ));
        }
        check_count("containers", self.containers.len(), limits::CONTAINERS)?;
        check_count("labels", self.labels.len(), limits::LABELS)?;
        for (k, v) in &self.labels {
            let f = format!("labels.{k}");
            if k.is_empty() {
                return Err(FieldError::new("labels", "a label key must not be empty"));
            }
            check_text(&f, "key", k, limits::LABEL_KEY_BYTES, true)?;
            check_text(&f, "value", v, limits::LABEL_VALUE_BYTES, true)?;
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
                check_count(&at("command"), cmd.len(), limits::COMMAND_ARGS)?;
                for (j, arg) in cmd.iter().enumerate() {
                    let f = format!("containers[{i}].command[{j}]");
                    check_text(&f, "argument", arg, limits::COMMAND_ARG_BYTES, false)?;
                }
            }
            check_count(&at("env"), c.env.len(), limits::ENV_VARS)?;
            for (k, v) in &c.env {
                let f = format!("containers[{i}].env.{k}");
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(FieldError::new(
                        if k.is_empty() { at("env") } else { f },
                        format!("invalid variable name {k:?}: not empty, without '=' or NUL"),
                    ));
                }
                check_text(&f, "name", k, limits::ENV_NAME_BYTES, false)?;
                check_text(&f, "value", v, limits::ENV_VALUE_BYTES, false)?;
            }
            check_count(&at("ports"), c.ports.len(), limits::PORTS)?;
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
            check_count(&at("volumes"), c.volumes.len(), limits::MOUNTS)?;
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
            check_count(&at("host_mounts"), c.host_mounts.len(), limits::MOUNTS)?;
            for (j, m) in c.host_mounts.iter().enumerate() {
                let f = |x: &str| format!("containers[{i}].host_mounts[{j}].{x}");
                check_host_path(&m.source).map_err(|e| FieldError::new(f("source"), e))?;
                check_container_path(&m.target).map_err(|e| FieldError::new(f("target"), e))?;
            }
            // Docker refuses a container with two mounts on one path
            // ("duplicate mount point"), whichever kinds they are.
            let mut targets: BTreeMap<String, String> = BTreeMap::new();
            let mounts = c
                .volumes
                .iter()
                .enumerate()
                .map(|(j, v)| (format!("containers[{i}].volumes[{j}].target"), &v.target))
                .chain(c.host_mounts.iter().enumerate().map(|(j, m)| {
                    (
                        format!("containers[{i}].host_mounts[{j}].target"),
                        &m.target,
                    )
                }));
            for (field, target) in mounts {
                if let Some(first) = targets.insert(clean_path(target), field.clone()) {
                    return Err(FieldError::new(
                        field,
                        format!("{target:?} is already the target of {first}"),
                    ));
                }
            }
            check_count(&at("devices"), c.devices.len(), limits::MOUNTS)?;
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
            check_count(&at("cap_add"), c.cap_add.len(), CAPABILITIES.len())?;
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
            // Docker binds each (address, port, protocol) once; a second
            // mapping of the same one fails only when the container starts.
            for (j, p) in c.ports.iter().enumerate() {
                if let Some(k) = c.ports[..j].iter().position(|q| q.conflicts_with(p)) {
                    return Err(FieldError::new(
                        format!("containers[{i}].ports[{j}]"),
                        format!(
                            "host port {} is already published by containers[{i}].ports[{k}]",
                            p.describe_host()
                        ),
                    ));
                }
            }
            if let Some(mb) = c.memory_mb {
                if !(limits::MIN_MEMORY_MB..=limits::MAX_MEMORY_MB).contains(&mb) {
                    return Err(FieldError::new(
                        at("memory_mb"),
                        format!(
                            "must be between {} and {} (1 TiB), got {mb}",
                            limits::MIN_MEMORY_MB,
                            limits::MAX_MEMORY_MB
                        ),
                    ));
                }
            }
            if let Some(h) = &c.healthcheck {
                h.validate(&at("healthcheck"))?;
            }
            if let Some(cpus) = c.cpus {
                if !(cpus.is_finite() && (limits::MIN_CPUS..=limits::MAX_CPUS).contains(&cpus)) {
                    return Err(FieldError::new(
                        at("cpus"),
                        format!(
                            "must be a number of cores between {} and {}",
                            limits::MIN_CPUS,
                            limits::MAX_CPUS
                        ),
                    ));
                }
            }
        }
        self.check_depends_on()?;
        // Across containers too: they share the device's ports.
        let ports: Vec<(String, &PortMapping)> = self
            .containers
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.ports
                    .iter()
                    .enumerate()
                    .map(move |(j, p)| (format!("containers[{i}].ports[{j}]"), p))
            })
            .collect();
        for (n, (field, p)) in ports.iter().enumerate() {
            if let Some((first, _)) = ports[..n].iter().find(|(_, q)| q.conflicts_with(p)) {
                return Err(FieldError::new(
                    field.clone(),
                    format!(
                        "host port {} is already published by {first}",
                        p.describe_host()
                    ),
                ));
            }
        }
        let size = self.encoded_len();
        if size > limits::APP_SPEC_BYTES {
            let (i, biggest) = self
                .containers
                .iter()
                .map(encoded_len)
                .enumerate()
                .max_by_key(|(_, n)| *n)
                .unwrap_or((0, 0));
            return Err(FieldError::new(
                format!("containers[{i}]"),
                format!(
                    "the app is {size} bytes encoded, over the limit of {} bytes; its largest container, containers[{i}], is {biggest} bytes",
                    limits::APP_SPEC_BYTES
                ),
            ));
        }
        Ok(())
    }

    /// The size of the spec in CBOR, as it travels inside `desired` and
    /// `cmd` payloads.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self)
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

/// A path inside the container: absolute, not the root itself (Docker
/// cannot mount over `/`), without `..` (Docker resolves it and mounts
/// somewhere else than the spec says), `:` (its mount syntax) or NUL.
fn check_container_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(':') || p.contains('\0') {
        return Err("must be an absolute path inside the container, without ':'".into());
    }
    if p.len() > limits::PATH_BYTES {
        return Err(format!(
            "is {} bytes, over the limit of {}",
            p.len(),
            limits::PATH_BYTES
        ));
    }
    if p.split('/').any(|part| part == "..") {
        return Err("must not contain '..'".into());
    }
    if clean_path(p) == "/" {
        return Err("must not be the container's root '/'".into());
    }
    Ok(())
}

fn check_host_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(':') || p.contains('\0') {
        return Err("must be an absolute host path, without ':'".into());
    }
    if p.len() > limits::PATH_BYTES {
        return Err(format!(
            "is {} bytes, over the limit of {}",
            p.len(),
            limits::PATH_BYTES
        ));
    }
    if p.split('/').any(|part| part == "..") {
        return Err("must not contain '..'".into());
    }
    Ok(())
}

/// `/a//b/./c/` → `/a/b/c`: the path Docker compares mount points by.
fn clean_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

pub(crate) fn check_count(field: &str, n: usize, max: usize) -> Result<(), FieldError> {
    if n > max {
        return Err(FieldError::new(
            field,
            format!("has {n} entries, over the limit of {max}"),
        ));
    }
    Ok(())
}

/// A string that reaches a process or a person: bounded, and never with a
/// NUL, which no `execve` argument or environment entry can hold (Docker
/// fails the container with "invalid argument"). `printable`: no control
/// characters at all, for text that is only displayed.
pub(crate) fn check_text(
    field: &str,
    what: &str,
    s: &str,
    max: usize,
    printable: bool,
) -> Result<(), FieldError> {
    if s.len() > max {
        return Err(FieldError::new(
            field,
            format!("{what} is {} bytes, over the limit of {max}", s.len()),
        ));
    }
    if s.contains('\0') {
        return Err(FieldError::new(
            field,
            format!("{what} contains a NUL character"),
        ));
    }
    if printable && s.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("{what} contains a control character"),
        ));
    }
    Ok(())
}

fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0 += data.len();
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Counting cannot fail, and every model type serialises.
    let _ = ciborium::into_writer(value, &mut n);
    n.0
}

impl PortMapping {
    /// Whether both mappings would bind the same host port: same port and
    /// protocol, and addresses that overlap (the same one, or either binds
    /// every address).
    pub fn conflicts_with(&self, other: &PortMapping) -> bool {
        if self.host != other.host || self.protocol != other.protocol {
            return false;
        }
        let ip = |m: &PortMapping| {
            m.host_ip
                .as_deref()
                .and_then(|s| s.parse::<std::net::IpAddr>().ok())
        };
        match (ip(self), ip(other)) {
            (Some(a), Some(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
            _ => true,
        }
    }

    /// `8080/tcp`, or `127.0.0.1:8080/tcp` with an address.
    pub fn describe_host(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match &self.host_ip {
            Some(ip) if ip.contains(':') => format!("[{ip}]:{}/{proto}", self.host),
            Some(ip) => format!("{ip}:{}/{proto}", self.host),
            None => format!("{}/{proto}", self.host),
        }
    }
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

impl AppSpec {
    /// `depends_on` names containers of this app, not itself, each once,
    /// and without a cycle (which could never start).
    fn check_depends_on(&self) -> Result<(), FieldError> {
        let index: BTreeMap<&Name, usize> = self
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (&c.name, i))
            .collect();
        for (i, c) in self.containers.iter().enumerate() {
            check_count(
                &format!("containers[{i}].depends_on"),
                c.depends_on.len(),
                limits::CONTAINERS,
            )?;
            for (j, d) in c.depends_on.iter().enumerate() {
                let f = format!("containers[{i}].depends_on[{j}]");
                if *d == c.name {
                    return Err(FieldError::new(f, "a container cannot depend on itself"));
                }
                if !index.contains_key(d) {
                    return Err(FieldError::new(
                        f,
                        format!("{:?} is not a container of this app", d.as_str()),
                    ));
                }
                if c.depends_on[..j].contains(d) {
                    return Err(FieldError::new(
                        f,
                        format!("{:?} is listed twice", d.as_str()),
                    ));
                }
            }
        }
        // Depth-first search; 0 unvisited, 1 on the path, 2 done.
        let mut mark = vec![0u8; self.containers.len()];
        fn visit(
            spec: &AppSpec,
            index: &BTreeMap<&Name, usize>,
            mark: &mut [u8],
            i: usize,
            path: &mut Vec<usize>,
        ) -> Result<(), FieldError> {
            mark[i] = 1;
            path.push(i);
            for (j, d) in spec.containers[i].depends_on.iter().enumerate() {
                let k = index[d];
                if mark[k] == 1 {
                    let start = path.iter().position(|&p| p == k).unwrap_or(0);
                    let names: Vec<&str> = path[start..]
                        .iter()
                        .chain(std::iter::once(&k))
                        .map(|&p| spec.containers[p].name.as_str())
                        .collect();
                    return Err(FieldError::new(
                        format!("containers[{i}].depends_on[{j}]"),
                        format!("dependency cycle: {}", names.join(" -> ")),
                    ));
                }
                if mark[k] == 0 {
                    visit(spec, index, mark, k, path)?;
                }
            }
            path.pop();
            mark[i] = 2;
            Ok(())
        }
        for i in 0..self.containers.len() {
            if mark[i] == 0 {
                visit(self, &index, &mut mark, i, &mut Vec::new())?;
            }
        }
        Ok(())
    }

    /// The containers' names in an order where each comes after all it
    /// depends on (spec order otherwise). Assumes a validated spec; a cycle
    /// leaves the rest in spec order.
    pub fn start_order(&self) -> Vec<Name> {
        let mut done: Vec<Name> = Vec::new();
        let mut left: Vec<&ContainerSpec> = self.containers.iter().collect();
        while !left.is_empty() {
            let before = left.len();
            let mut i = 0;
            while i < left.len() {
                if left[i].depends_on.iter().all(|d| done.contains(d)) {
                    done.push(left.remove(i).name.clone());
                } else {
                    i += 1;
                }
            }
            if left.len() == before {
                done.extend(left.drain(..).map(|c| c.name.clone()));
            }
        }
        done
    }
}

/// Bounds on a health check's durations and retries.
pub mod health_limits {
    pub const MIN_DURATION_MS: u64 = 1;
    /// One day.
    pub const MAX_DURATION_MS: u64 = 24 * 60 * 60 * 1000;
    pub const MAX_RETRIES: u32 = 1000;
}

impl HealthCheck {
    /// Docker's test forms and bounded durations. `at` is the field path
    /// of this check, e.g. `containers[0].healthcheck`.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        let f = |x: &str| format!("{at}.{x}");
        let Some(first) = self.test.first() else {
            return Err(FieldError::new(
                f("test"),
                "must not be empty: [\"CMD\", prog, args…], [\"CMD-SHELL\", command] or [\"NONE\"]",
            ));
        };
        check_count(&f("test"), self.test.len(), limits::COMMAND_ARGS)?;
        for (j, arg) in self.test.iter().enumerate() {
            check_text(
                &format!("{at}.test[{j}]"),
                "argument",
                arg,
                limits::COMMAND_ARG_BYTES,
                false,
            )?;
        }
        match first.as_str() {
            "CMD" if self.test.len() < 2 => {
                return Err(FieldError::new(
                    f("test"),
                    "CMD needs the program to run: [\"CMD\", prog, args…]",
                ))
            }
            "CMD-SHELL" if self.test.len() != 2 || self.test[1].trim().is_empty() => {
                return Err(FieldError::new(
                    f("test"),
                    "CMD-SHELL takes exactly one non-empty shell command: [\"CMD-SHELL\", command]",
                ))
            }
            "NONE" if self.test.len() != 1 => {
                return Err(FieldError::new(f("test"), "NONE takes no arguments"))
            }
            "CMD" | "CMD-SHELL" | "NONE" => {}
            other => {
                return Err(FieldError::new(
                    f("test[0]"),
                    format!("{other:?} is not CMD, CMD-SHELL or NONE"),
                ))
            }
        }
        for (name, v) in [
            ("interval_ms", self.interval_ms),
            ("timeout_ms", self.timeout_ms),
            ("start_period_ms", self.start_period_ms),
        ] {
            if let Some(ms) = v {
                if !(health_limits::MIN_DURATION_MS..=health_limits::MAX_DURATION_MS).contains(&ms)
                {
                    return Err(FieldError::new(
                        f(name),
                        format!(
                            "must be between {} ms and {} ms (one day), got {ms}",
                            health_limits::MIN_DURATION_MS,
                            health_limits::MAX_DURATION_MS
                        ),
                    ));
                }
            }
        }
        if let Some(r) = self.retries {
            if r > health_limits::MAX_RETRIES {
                return Err(FieldError::new(
                    f("retries"),
                    format!("must be at most {}, got {r}", health_limits::MAX_RETRIES),
                ));
            }
        }
        Ok(())
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
    /// Parses a reference by the grammar of distribution/reference, the
    /// one Docker applies (`container_image_dist_ref` is a port of it,
    /// tested against the Go original), so whatever passes here also
    /// passes `docker pull`. A reference without tag or digest gets
    /// `latest`. Digests must also be of an algorithm Docker can verify.
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let r = container_image_dist_ref::ImgRef::new(s).map_err(|e| {
            format!(
                "{s:?} is not a valid image reference: {} (at character {})",
                describe_reference_error(e.kind()),
                usize::from(e.index()) + 1
            )
        })?;
        let digest = match r.digest() {
            Some(d) => {
                let d = d.to_str();
                check_digest(d)
                    .map_err(|m| format!("{s:?} is not a valid image reference: {m}"))?;
                Some(d.to_string())
            }
            None => None,
        };
        let tag = r.tag().map(str::to_string);
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(ImageRef {
            repository: r.name().to_str().to_string(),
            tag,
            digest,
        })
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

/// The digests Docker can verify (go-digest's registered algorithms):
/// algorithm and the length of its lower-case hex value.
const DIGEST_ALGORITHMS: &[(&str, usize)] = &[("sha256", 64), ("sha384", 96), ("sha512", 128)];

fn check_digest(d: &str) -> Result<(), String> {
    let (alg, hex) = d.split_once(':').unwrap_or((d, ""));
    let Some((_, len)) = DIGEST_ALGORITHMS.iter().find(|(a, _)| *a == alg) else {
        return Err(format!(
            "digest algorithm {alg:?} is not one of sha256, sha384 or sha512"
        ));
    };
    if hex.len() != *len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("a {alg} digest is {len} lower-case hex digits"));
    }
    Ok(())
}

/// The parser reports a kind and a position; people want a sentence.
fn describe_reference_error(kind: container_image_dist_ref::err::Kind) -> &'static str {
    use container_image_dist_ref::err::Kind::*;
    match kind {
        HostOrPathMissing | PathMissing | HostMissing | RefMissing => "the repository name is missing",
        HostOrPathTooLong | NameTooLong | PathTooLong | HostTooLong => {
            "the name is longer than 255 characters"
        }
        HostOrPathInvalidChar | PathInvalidChar => {
            "repository names are lower-case letters and digits, with '.', '_', '__', '-' or '/' between them"
        }
        HostOrPathInvalidComponentEnd | PathComponentInvalidEnd => {
            "each part of the name must start and end with a letter or digit"
        }
        PortOrTagMissing | TagMissing => "':' must be followed by a tag",
        PortOrTagInvalidChar | TagInvalidChar => {
            "a tag is letters, digits, '_', '.' and '-', starting with a letter, digit or '_'; only one ':' tag is allowed"
        }
        TagTooLong => "a tag is at most 128 characters",
        HostComponentInvalidEnd | HostInvalidChar => "the registry host is not a valid host name",
        Port | PortInvalidChar | PortTooLong | PortMissing => "the registry port is not a valid number",
        OciRegisteredAlgorithmWrongDigestLength => {
            "the digest has the wrong length for its algorithm (sha256 is 64 hex digits)"
        }
        AlgorithmMissing | AlgorithmInvalidChar | AlgorithmTooLong | InvalidOciAlgorithm
        | AlgorithmInvalidNumericPrefix => "a digest is algorithm:hex, e.g. sha256:<64 hex digits>",
        EncodedMissing | EncodedInvalidChar | EncodedNonLowerHex | OciRegisteredDigestInvalidChar
        | EncodingTooShort | EncodingTooLong => "a digest's value is lower-case hex digits of the algorithm's length",
        _ => "the registry address is not valid",
    }
}

/// Whether an app deployed on a device should be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Stopped,
    /// The containers exist with their processes frozen (`docker pause`).
    Paused,
}

/// Everything one device should run. Written only by the orchestrator;
/// `generation` grows by one on every change.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredState {
    pub generation: u64,
    pub apps: Vec<DesiredApp>,
    /// The agent binary the device should run; `None`: the one it was
    /// installed with. Not encoded when `None`, so older states decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::update::AgentTarget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredApp {
    pub spec: AppSpec,
    pub run: RunState,
    /// The generation of the last deploy or start of this app. A value the
    /// device has not acted on yet means "run it now", even where the
    /// restart policy would leave an exited container alone; carried in the
    /// state, not the command, so it holds whichever message arrives first.
    #[serde(default)]
    pub started_at: u64,
    /// The app's release this spec is (0: none, an older orchestrator).
    /// The agent reports it back in [`AppStatus::release`].
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub release: u64,
    /// The generation of the last restart request for this app (0: none).
    /// The agent restarts the app's containers when this is above the mark
    /// it last carried out. A generation rather than a count because
    /// generations only grow on a device: a count would start again at 0
    /// after a remove and a redeploy, and an agent that missed those could
    /// not tell a new restart from an old one. Not encoded when 0, so older
    /// agents and stored states decode it as before.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub restarted_at: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl DesiredState {
    pub fn app(&self, name: &Name) -> Option<&DesiredApp> {
        self.apps.iter().find(|a| &a.spec.name == name)
    }
}

/// Where an app is on a device, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Paused as asked (`RunState::Paused`).
    Paused,
    Failed,
}

/// What runs on a device. Written only by the agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// An agent update under way, or the last one that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_update: Option<crate::update::AgentUpdateStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The release of the spec these containers were made from
    /// ([`DesiredApp::release`]); 0 when unknown.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub release: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Docker's health status when the container has a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// How often Docker has restarted this container.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
}

/// Docker's health status of a container with a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
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
        let d = ImageRef::parse(&format!("busybox@{DIGEST}")).expect("ok");
        assert_eq!(d.pull_tag(), DIGEST);
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
        // Found by fuzz/ (app_spec): a reference that was only valid
        // without `:latest` passed validation, and the agent's own
        // ImageRef::parse then refused the stored normal form on every
        // reconcile. Names are bounded (255) apart from tags, so the
        // longest name still parses once `:latest` is added.
        let longest = "a".repeat(255);
        let mut s = spec(&longest);
        s.validate().expect("the longest name is valid");
        assert_eq!(s.containers[0].image, format!("{longest}:latest"));
        let r = ImageRef::parse(&s.containers[0].image).expect("normal form parses");
        assert_eq!(r.to_string(), s.containers[0].image);
        let mut s = spec(&"a".repeat(256));
        assert_eq!(
            s.validate().expect_err("too long").field,
            "containers[0].image"
        );
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_follow_the_distribution_grammar() {
        let ok = [
            ("busybox", "busybox:latest"),
            (
                "127.0.0.1:5000/drover/busybox:2",
                "127.0.0.1:5000/drover/busybox:2",
            ),
            ("localhost/a:1", "localhost/a:1"),
            ("[::1]:5000/a:1", "[::1]:5000/a:1"),
            (
                "ghcr.io/owner/app_name-x__y.z:V1.2_rc-3",
                "ghcr.io/owner/app_name-x__y.z:V1.2_rc-3",
            ),
            ("Registry.Example.com/a/b:1", "Registry.Example.com/a/b:1"),
        ];
        for (raw, normal) in ok {
            let r = ImageRef::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(r.to_string(), normal);
            assert_eq!(ImageRef::parse(normal).expect("normal form"), r);
        }
        let pinned = ImageRef::parse(&format!("a/b:1@{DIGEST}")).expect("tag and digest");
        assert_eq!(
            (pinned.tag.as_deref(), pinned.pull_tag()),
            (Some("1"), DIGEST)
        );
        assert_eq!(pinned.to_string(), format!("a/b:1@{DIGEST}"));
        let sha512 = format!("a@sha512:{}", "f".repeat(128));
        assert!(ImageRef::parse(&sha512).is_ok());

        // What the outside probe got accepted, and what Docker refuses.
        let bad = [
            "busybox@sha256:abc",
            "a/b:c:d",
            "a:b:c",
            "-rm",
            "busybox:\u{e9}",
            "busybox:-x",
            "a//b",
            "a/b/",
            "a..b",
            "busybox:",
            "@sha256:0123",
            "Busybox:1",
            "bad image",
            "busybox\n",
        ];
        for raw in bad {
            let e = ImageRef::parse(raw).expect_err(raw);
            assert!(e.contains("not a valid image reference"), "{raw}: {e}");
        }
        // Digests Docker can verify only, in lower-case hex.
        for raw in [
            format!("a@md5:{}", "0".repeat(32)),
            format!("a@sha256:{}", "A".repeat(64)),
            format!("a@sha256:{}", "0".repeat(63)),
            format!("a@sha384:{}", "0".repeat(64)),
        ] {
            let e = ImageRef::parse(&raw).expect_err(&raw);
            assert!(e.contains("digest"), "{raw}: {e}");
        }
        let e = ImageRef::parse("a/b:c:d").expect_err("two tags");
        assert!(e.contains("at character 6"), "{e}");
    }

    #[test]
    fn registry_hosts_follow_docker() {
        let host = |s: &str| ImageRef::parse(s).expect("valid").registry_host();
        assert_eq!(host("127.0.0.1:5001/drover/busybox:2"), "127.0.0.1:5001");
        assert_eq!(
            host(&format!("Registry.Example.com/a/b@{DIGEST}")),
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

    fn port(host: u16, protocol: Protocol, host_ip: Option<&str>) -> PortMapping {
        PortMapping {
            host,
            container: 80,
            protocol,
            host_ip: host_ip.map(str::to_string),
        }
    }

    fn volume(target: &str) -> VolumeBind {
        VolumeBind {
            source: "data".into(),
            target: target.into(),
            read_only: false,
        }
    }

    #[test]
    fn what_only_docker_refused_is_refused_by_name() {
        let mount = |target: &str| HostMount {
            source: "/srv".into(),
            target: target.into(),
            read_only: false,
        };
        let cases: Vec<(AppSpec, &str)> = vec![
            (
                with(|c| c.volumes.push(volume("/"))),
                "containers[0].volumes[0].target",
            ),
            (
                with(|c| c.volumes.push(volume("//./"))),
                "containers[0].volumes[0].target",
            ),
            (
                with(|c| c.volumes.push(volume("/a/../b"))),
                "containers[0].volumes[0].target",
            ),
            (
                with(|c| c.volumes.push(volume("/.."))),
                "containers[0].volumes[0].target",
            ),
            (
                with(|c| c.host_mounts.push(mount("/"))),
                "containers[0].host_mounts[0].target",
            ),
            (
                with(|c| c.host_mounts.push(mount("/x/.."))),
                "containers[0].host_mounts[0].target",
            ),
            (
                with(|c| {
                    c.devices.push(DeviceMapping {
                        host: "/dev/null".into(),
                        container: Some("/".into()),
                        permissions: None,
                    })
                }),
                "containers[0].devices[0].container",
            ),
            // Two mounts on one path, spelled differently.
            (
                with(|c| {
                    c.volumes.push(volume("/data"));
                    c.host_mounts.push(mount("/data/"));
                }),
                "containers[0].host_mounts[0].target",
            ),
            (
                with(|c| {
                    c.env.insert("X".into(), "a\0b".into());
                }),
                "containers[0].env.X",
            ),
            (
                with(|c| {
                    c.env.insert("X\0Y".into(), "1".into());
                }),
                "containers[0].env.X\0Y",
            ),
            (
                with(|c| c.command = Some(vec!["sh".into(), "-c\0".into()])),
                "containers[0].command[1]",
            ),
            (
                with(|c| c.memory_mb = Some(1_000_000_000_000)),
                "containers[0].memory_mb",
            ),
            (with(|c| c.memory_mb = Some(5)), "containers[0].memory_mb"),
            (with(|c| c.cpus = Some(0.001)), "containers[0].cpus"),
            (with(|c| c.cpus = Some(f64::INFINITY)), "containers[0].cpus"),
            (
                with(|c| {
                    c.ports.push(port(8080, Protocol::Tcp, None));
                    c.ports.push(port(8080, Protocol::Tcp, Some("127.0.0.1")));
                }),
                "containers[0].ports[1]",
            ),
        ];
        for (s, want) in cases {
            let (field, msg) = invalid_field(s);
            assert_eq!(field, want, "{msg}");
        }
        let (_, msg) = invalid_field(with(|c| c.memory_mb = Some(1_000_000_000_000)));
        assert!(msg.contains("1048576"), "{msg}");

        // The same host port in two containers of one app.
        let mut s = spec("busybox:1");
        s.containers[0].ports.push(port(80, Protocol::Udp, None));
        let mut other = s.containers[0].clone();
        other.name = Name::new("side").expect("name");
        s.containers.push(other);
        let (field, msg) = invalid_field(s);
        assert_eq!(field, "containers[1].ports[0]");
        assert!(
            msg.contains("80/udp") && msg.contains("containers[0].ports[0]"),
            "{msg}"
        );

        // Still fine: the limits themselves, other protocols and addresses.
        let mut s = with(|c| {
            c.memory_mb = Some(limits::MAX_MEMORY_MB);
            c.cpus = Some(0.01);
            c.ports.push(port(53, Protocol::Tcp, None));
            c.ports.push(port(53, Protocol::Udp, None));
            c.ports.push(port(8080, Protocol::Tcp, Some("127.0.0.1")));
            c.ports.push(port(8080, Protocol::Tcp, Some("127.0.0.2")));
            c.volumes.push(volume("/data/./a"));
            c.host_mounts.push(mount("/data/b"));
            c.env.insert("MULTI".into(), "line\none".into());
        });
        s.validate().expect("valid");
    }

    #[test]
    fn ports_conflict_by_address_port_and_protocol() {
        let p = |h, ip| port(h, Protocol::Tcp, ip);
        assert!(p(80, None).conflicts_with(&p(80, Some("10.0.0.1"))));
        assert!(p(80, Some("0.0.0.0")).conflicts_with(&p(80, Some("127.0.0.1"))));
        assert!(p(80, Some("::1")).conflicts_with(&p(80, Some("::1"))));
        assert!(!p(80, Some("127.0.0.1")).conflicts_with(&p(80, Some("::1"))));
        assert!(!p(80, None).conflicts_with(&p(81, None)));
        assert!(!p(80, None).conflicts_with(&port(80, Protocol::Udp, None)));
        assert_eq!(p(80, Some("::1")).describe_host(), "[::1]:80/tcp");
    }

    #[test]
    fn spec_sizes_are_bounded_by_field() {
        // The outside probe: one 300 KiB value wedged the orchestrator's
        // MQTT link once deployed.
        let big = "x".repeat(300 * 1024);
        let (field, msg) = invalid_field(with(|c| {
            c.env.insert("BIG".into(), big.clone());
        }));
        assert_eq!(field, "containers[0].env.BIG");
        assert!(msg.contains("32768"), "{msg}");
        let (field, _) = invalid_field(with(|c| {
            c.env
                .insert("K".repeat(limits::ENV_NAME_BYTES + 1), "1".into());
        }));
        assert!(field.starts_with("containers[0].env.KKK"), "{field}");
        let (field, _) = invalid_field(with(|c| {
            c.env = (0..=limits::ENV_VARS)
                .map(|i| (format!("V{i}"), String::new()))
                .collect();
        }));
        assert_eq!(field, "containers[0].env");
        let (field, _) = invalid_field(with(|c| {
            c.command = Some(vec!["x".repeat(limits::COMMAND_ARG_BYTES + 1)]);
        }));
        assert_eq!(field, "containers[0].command[0]");
        let (field, _) = invalid_field(with(|c| {
            c.command = Some(vec![String::new(); limits::COMMAND_ARGS + 1]);
        }));
        assert_eq!(field, "containers[0].command");
        let mut s = spec("busybox:1");
        s.labels
            .insert("k".into(), "v".repeat(limits::LABEL_VALUE_BYTES + 1));
        assert_eq!(invalid_field(s).0, "labels.k");
        let mut s = spec("busybox:1");
        s.labels.insert("k\u{1b}[2J".into(), "v".into());
        assert_eq!(invalid_field(s).0, "labels.k\u{1b}[2J");
        let mut s = spec("busybox:1");
        s.labels = (0..=limits::LABELS)
            .map(|i| (format!("l{i}"), String::new()))
            .collect();
        assert_eq!(invalid_field(s).0, "labels");

        // Every field within its bound, the whole over the app's bound:
        // named by its largest container.
        let value = "v".repeat(limits::ENV_VALUE_BYTES);
        let mut s = spec("busybox:1");
        let mut second = s.containers[0].clone();
        second.name = Name::new("second").expect("name");
        second.env = (0..5).map(|i| (format!("V{i}"), value.clone())).collect();
        s.containers.push(second);
        let (field, msg) = invalid_field(s);
        assert_eq!(field, "containers[1]");
        assert!(msg.contains(&limits::APP_SPEC_BYTES.to_string()), "{msg}");
    }

    #[test]
    fn the_largest_valid_app_fits_in_one_message() {
        // What `limits::APP_SPEC_BYTES` promises: a device that runs nothing
        // else can always be sent one app that validates, in a `desired`
        // and in a `cmd` payload.
        let value = "v".repeat(limits::ENV_VALUE_BYTES);
        let mut s = spec("busybox:1");
        let mut n = 0;
        loop {
            let mut bigger = s.clone();
            bigger.containers[0]
                .env
                .insert(format!("V{n}"), value.clone());
            if bigger.encoded_len() > limits::APP_SPEC_BYTES {
                break;
            }
            s = bigger;
            n += 1;
        }
        // Top up to the byte.
        let room = limits::APP_SPEC_BYTES - s.encoded_len();
        s.containers[0]
            .env
            .insert("Z".into(), "z".repeat(room.saturating_sub(8)));
        s.validate().expect("at the bound");
        assert!(s.encoded_len() > limits::APP_SPEC_BYTES - 16);
        let desired = DesiredState {
            generation: u64::MAX,
            apps: vec![DesiredApp {
                spec: s.clone(),
                run: RunState::Running,
                started_at: u64::MAX,
                release: u64::MAX,
                restarted_at: u64::MAX,
            }],
            agent: None,
        };
        let cmd = crate::payload::Command {
            id: uuid_like(),
            issued_at_ms: u64::MAX,
            action: crate::payload::Action::Apply {
                op: crate::payload::Op::Deploy,
                app: s.name.clone(),
                desired: desired.clone(),
            },
        };
        let bytes = crate::codec::encode(&cmd);
        assert!(
            bytes.len() <= crate::codec::MAX_PAYLOAD_BYTES,
            "{}",
            bytes.len()
        );
        let back: crate::payload::Command = crate::codec::decode(&bytes).expect("decodes");
        assert_eq!(back, cmd);
    }

    fn uuid_like() -> String {
        "00000000-0000-4000-8000-000000000000".into()
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

    fn two(extra: serde_json::Value) -> AppSpec {
        let mut v = serde_json::json!({
            "name": "web",
            "containers": [
                {"name": "db", "image": "busybox:1"},
                {"name": "api", "image": "busybox:1"},
                {"name": "ui", "image": "busybox:1"}
            ]
        });
        for (i, patch) in extra.as_array().expect("array").iter().enumerate() {
            for (k, val) in patch.as_object().expect("object") {
                v["containers"][i][k] = val.clone();
            }
        }
        serde_json::from_value(v).expect("valid json")
    }

    fn err_of(mut s: AppSpec) -> FieldError {
        s.validate().expect_err("must be refused")
    }

    #[test]
    fn depends_on_is_checked_with_the_field_path() {
        let ok =
            two(serde_json::json!([{}, {"depends_on": ["db"]}, {"depends_on": ["api", "db"]}]));
        let mut s = ok.clone();
        s.validate().expect("valid");
        let order: Vec<String> = s
            .start_order()
            .iter()
            .map(|n| n.as_str().to_string())
            .collect();
        assert_eq!(order, vec!["db", "api", "ui"]);
        let rev = two(serde_json::json!([{"depends_on": ["api"]}, {"depends_on": ["ui"]}, {}]));
        let names: Vec<String> = rev
            .start_order()
            .iter()
            .map(|n| n.as_str().to_string())
            .collect();
        assert_eq!(names, vec!["ui", "api", "db"]);

        let e = err_of(two(serde_json::json!([{}, {"depends_on": ["nope"]}])));
        assert_eq!(e.field, "containers[1].depends_on[0]");
        assert!(e.message.contains("not a container"), "{}", e.message);
        let e = err_of(two(serde_json::json!([{}, {"depends_on": ["api"]}])));
        assert_eq!(e.field, "containers[1].depends_on[0]");
        assert!(e.message.contains("itself"), "{}", e.message);
        let e = err_of(two(serde_json::json!([{}, {"depends_on": ["db", "db"]}])));
        assert_eq!(e.field, "containers[1].depends_on[1]");
        let e = err_of(two(serde_json::json!([
            {"depends_on": ["ui"]}, {"depends_on": ["db"]}, {"depends_on": ["api"]}
        ])));
        assert!(e.field.starts_with("containers["), "{}", e.field);
        assert!(e.message.contains("cycle"), "{}", e.message);
        assert!(e.message.contains("db -> ui -> api -> db"), "{}", e.message);
    }

    #[test]
    fn healthchecks_take_dockers_forms_and_bounds() {
        let hc = |h: serde_json::Value| two(serde_json::json!([{"healthcheck": h}]));
        for good in [
            serde_json::json!({"test": ["CMD-SHELL", "test -f /tmp/ok"], "interval_ms": 500, "retries": 3}),
            serde_json::json!({"test": ["CMD", "true"]}),
            serde_json::json!({"test": ["NONE"]}),
        ] {
            hc(good.clone())
                .validate()
                .unwrap_or_else(|e| panic!("{good}: {e:?}"));
        }
        for (bad, field, says) in [
            (
                serde_json::json!({"test": []}),
                "containers[0].healthcheck.test",
                "empty",
            ),
            (
                serde_json::json!({"test": ["CMD"]}),
                "containers[0].healthcheck.test",
                "CMD needs",
            ),
            (
                serde_json::json!({"test": ["SHELL", "x"]}),
                "containers[0].healthcheck.test[0]",
                "not CMD",
            ),
            (
                serde_json::json!({"test": ["CMD-SHELL"]}),
                "containers[0].healthcheck.test",
                "CMD-SHELL",
            ),
            (
                serde_json::json!({"test": ["NONE", "x"]}),
                "containers[0].healthcheck.test",
                "NONE",
            ),
            (
                serde_json::json!({"test": ["CMD", "true"], "interval_ms": 0}),
                "containers[0].healthcheck.interval_ms",
                "between",
            ),
            (
                serde_json::json!({"test": ["CMD", "true"], "timeout_ms": 86_400_001u64}),
                "containers[0].healthcheck.timeout_ms",
                "one day",
            ),
            (
                serde_json::json!({"test": ["CMD", "true"], "retries": 1001}),
                "containers[0].healthcheck.retries",
                "at most",
            ),
        ] {
            let e = err_of(hc(bad.clone()));
            assert_eq!(e.field, field, "{bad}");
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn restarted_at_is_left_out_at_zero_and_absent_decodes_as_zero() {
        let app = DesiredApp {
            spec: spec("busybox:1"),
            run: RunState::Running,
            started_at: 3,
            release: 0,
            restarted_at: 0,
        };
        let cbor = |a: &DesiredApp| {
            let mut bytes = Vec::new();
            ciborium::into_writer(a, &mut bytes).expect("encodes");
            bytes
        };
        let bytes = cbor(&app);
        let v: ciborium::Value = ciborium::from_reader(&bytes[..]).expect("decodes");
        let keys: Vec<String> = v
            .as_map()
            .expect("a map")
            .iter()
            .filter_map(|(k, _)| k.as_text().map(str::to_string))
            .collect();
        assert_eq!(
            keys,
            ["spec", "run", "started_at"],
            "what an older agent reads"
        );
        let back: DesiredApp = ciborium::from_reader(&bytes[..]).expect("decodes");
        assert_eq!(back.restarted_at, 0);
        let restarted = DesiredApp {
            restarted_at: 9,
            ..app
        };
        let back: DesiredApp = ciborium::from_reader(&cbor(&restarted)[..]).expect("decodes");
        assert_eq!(back.restarted_at, 9);
    }

    #[test]
    fn a_spec_without_the_new_fields_keeps_its_fingerprint() {
        // Pinned: an agent upgraded to this version must not recreate the
        // containers of an unchanged spec.
        let a = spec("busybox:1").containers[0].clone();
        let before = a.fingerprint();
        let mut b = a.clone();
        b.healthcheck = Some(HealthCheck {
            test: vec!["CMD".into(), "true".into()],
            interval_ms: None,
            timeout_ms: None,
            retries: None,
            start_period_ms: None,
        });
        assert_ne!(before, b.fingerprint());
        let mut bytes = Vec::new();
        ciborium::into_writer(&a, &mut bytes).expect("encodes");
        let v: ciborium::Value = ciborium::from_reader(&bytes[..]).expect("decodes");
        let keys: Vec<String> = v
            .as_map()
            .expect("a map")
            .iter()
            .filter_map(|(k, _)| k.as_text().map(str::to_string))
            .collect();
        assert!(
            !keys.iter().any(|k| k == "healthcheck" || k == "depends_on"),
            "{keys:?}"
        );
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
