//! Agent configuration and the device's identity.
//!
//! The device id is the MQTT client id and the topic segment, so it must stay
//! the same across restarts: a new id would look like a new device to the
//! orchestrator and orphan the old persistent session.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_shared::topic::Topics;
use drover_shared::DeviceId;

const DEVICE_ID_FILE: &str = "device-id";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot create state directory {path}")]
    CreateStateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path} is not writable")]
    StateDirNotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read device id from {path}")]
    ReadDeviceId {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device id in {path} is invalid")]
    InvalidStoredDeviceId {
        path: PathBuf,
        source: drover_shared::IdError,
    },
    #[error("cannot persist device id to {path}")]
    WriteDeviceId {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything [`crate::run`] needs. Build it with [`AgentConfig::new`] and
/// override fields as needed.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `None`: load from `<state_dir>/device-id`, else generate
    /// `<hostname>-<6 hex>` and persist it.
    pub device_id: Option<DeviceId>,
    pub broker_host: String,
    pub broker_port: u16,
    /// MQTT over TLS with this client config (see [`crate::tls`]); plain
    /// MQTT when `None`.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub topics: Topics,
    pub state_dir: PathBuf,
    pub keep_alive: Duration,
    pub heartbeat_interval: Duration,
    pub telemetry_interval: Duration,
    /// The periodic drift check, a backstop for the Docker event stream,
    /// which triggers a pass as soon as a managed container dies or goes.
    pub reconcile_interval: Duration,
    /// Pulls that fail for a reason that may pass are retried after
    /// exponential backoff with full jitter: base, doubling, capped at max.
    pub pull_retry_base: Duration,
    pub pull_retry_max: Duration,
    /// No pull starts with less free space than this on the file system of
    /// Docker's data root; the pull is retried instead.
    pub min_free_disk_bytes: u64,
    /// Remove images this agent pulled once no desired app uses them.
    pub image_cleanup: bool,
    pub image_cleanup_max_per_pass: usize,
    /// Unused pulled images to keep anyway, most recently used first.
    pub keep_unused_images: usize,
    /// Presented once when the state directory holds no credential.
    pub enroll_token: Option<drover_shared::payload::Secret>,
    /// Labels the device sets on itself, sent in `hello`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// How this binary replaces itself when its desired state names
    /// another agent binary; `None`: it cannot (the agent inside
    /// `drover serve --local-agent`), and says so in `hello`.
    pub self_update: Option<crate::update::SelfUpdate>,
}

/// Parses one `--label key=value`. Keys follow Kubernetes label keys: an
/// optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters, alphanumeric at both ends with `-`, `_`, `.` inside; the
/// whole key and the value are bounded as app labels are
/// ([`drover_shared::model::limits`]). Values: any printable text.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    use drover_shared::model::limits::{LABEL_KEY_BYTES, LABEL_VALUE_BYTES};
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    if key.len() > LABEL_KEY_BYTES {
        return Err(format!(
            "label key is {} bytes, over {LABEL_KEY_BYTES}",
            key.len()
        ));
    }
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !name_ok(name) {
        return Err(format!(
            "label key {key:?}: the name must be 1 to 63 characters, letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        if p.is_empty() || p.len() > 253 || !p.split('.').all(label_ok) {
            return Err(format!(
                "label key {key:?}: the prefix before '/' must be a DNS subdomain (lower-case, e.g. example.com)"
            ));
        }
    }
    if value.len() > LABEL_VALUE_BYTES {
        return Err(format!(
            "label {key:?}: the value is {} bytes, over {LABEL_VALUE_BYTES}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "label {key:?}: the value must not hold control characters"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod label_tests {
    use super::parse_label;

    #[test]
    fn labels_take_kubernetes_keys_and_bounded_values() {
        assert_eq!(
            parse_label("site=berlin"),
            Ok(("site".into(), "berlin".into()))
        );
        assert_eq!(
            parse_label("example.com/rack=a=b"),
            Ok(("example.com/rack".into(), "a=b".into()))
        );
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        for bad in [
            "novalue",
            "=x",
            "-a=x",
            "a-=x",
            "a b=x",
            "Example.com/a=x",
            "/a=x",
            "a=\n",
        ] {
            assert!(parse_label(bad).is_err(), "{bad:?}");
        }
        assert!(parse_label(&format!("{}=x", "a".repeat(64))).is_err());
        assert!(parse_label(&format!("k={}", "v".repeat(513))).is_err());
    }
}

impl AgentConfig {
    pub fn new(broker_host: impl Into<String>, broker_port: u16, state_dir: PathBuf) -> Self {
        AgentConfig {
            device_id: None,
            enroll_token: None,
            broker_host: broker_host.into(),
            broker_port,
            tls: None,
            topics: Topics::default(),
            state_dir,
            keep_alive: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            telemetry_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(15),
            pull_retry_base: Duration::from_secs(1),
            pull_retry_max: Duration::from_secs(60),
            min_free_disk_bytes: 256 * 1024 * 1024,
            image_cleanup: true,
            image_cleanup_max_per_pass: 5,
            keep_unused_images: 0,
            labels: Default::default(),
            self_update: None,
        }
    }

    pub(crate) fn reconcile_options(&self) -> crate::reconcile::ReconcileOptions {
        crate::reconcile::ReconcileOptions {
            pull_backoff: crate::backoff::Backoff::new(self.pull_retry_base, self.pull_retry_max),
            min_free_disk_bytes: self.min_free_disk_bytes,
            image_cleanup: self.image_cleanup,
            image_cleanup_max_per_pass: self.image_cleanup_max_per_pass,
            keep_unused_images: self.keep_unused_images,
        }
    }
}

/// Creates the state directory. Without it there is nothing to run on, so
/// this is fatal; an existing directory that cannot be written is not (see
/// [`probe_writable`]).
pub(crate) fn prepare_state_dir(dir: &Path) -> Result<(), ConfigError> {
    // Owner-only when new: it holds the credential and registry secrets.
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| ConfigError::CreateStateDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Whether the state directory takes a write now. A read-only or full
/// state directory must not stop the agent (under a supervisor that is a
/// restart loop and a device offline for good): it runs on what it can
/// read and reports the problem instead.
pub(crate) fn probe_writable(dir: &Path) -> Result<(), ConfigError> {
    crate::store::write_file(&dir.join(".write-probe"), b"ok", None)
        .and_then(|()| std::fs::remove_file(dir.join(".write-probe")))
        .map_err(|source| ConfigError::StateDirNotWritable {
            path: dir.to_path_buf(),
            source,
        })
}

/// Returns the configured id, else the persisted one, else a new one that is
/// persisted before it is used.
pub(crate) fn resolve_device_id(
    configured: Option<&DeviceId>,
    state_dir: &Path,
) -> Result<DeviceId, ConfigError> {
    if let Some(id) = configured {
        return Ok(id.clone());
    }
    let path = state_dir.join(DEVICE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            return DeviceId::new(s.trim())
                .map_err(|source| ConfigError::InvalidStoredDeviceId { path, source });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::ReadDeviceId { path, source }),
    }
    let id = generate_device_id(sysinfo::System::host_name().as_deref().unwrap_or(""));
    crate::store::write_file(&path, format!("{id}\n").as_bytes(), None)
        .map_err(|source| ConfigError::WriteDeviceId { path, source })?;
    Ok(id)
}

/// `<hostname-sanitised>-<6 random hex>`: readable in a fleet list, and the
/// suffix keeps cloned SD card images with the same hostname apart.
pub(crate) fn generate_device_id(hostname: &str) -> DeviceId {
    let mut base: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = base
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    base = trimmed;
    base.truncate(DeviceId::MAX_LEN - 7);
    if base.is_empty() {
        base.push_str("device");
    }
    let suffix: [u8; 3] = rand::random();
    let id = format!("{base}-{:02x}{:02x}{:02x}", suffix[0], suffix[1], suffix[2]);
    match DeviceId::new(id) {
        Ok(id) => id,
        // Unreachable by construction (sanitised, bounded, alphanumeric start),
        // but a device must never fail to boot over its own name.
        Err(_) => DeviceId::new(format!(
            "device-{:02x}{:02x}{:02x}",
            suffix[0], suffix[1], suffix[2]
        ))
        .unwrap_or_else(|e| unreachable!("fixed-form device id rejected: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_new_state_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("var/lib/drover-agent");
        prepare_state_dir(&state).expect("created");
        let mode = std::fs::metadata(&state)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "state dir mode {mode:o}");
        prepare_state_dir(&state).expect("an existing one is fine");
    }

    #[test]
    fn generated_ids_are_valid_and_sanitised() {
        let id = generate_device_id("My Pi/4 #kitchen");
        assert!(id.as_str().starts_with("my-pi-4--kitchen-"), "{id}");
        assert_eq!(id.as_str().len(), "my-pi-4--kitchen-".len() + 6);
        assert!(generate_device_id("").as_str().starts_with("device-"));
        assert!(generate_device_id("--").as_str().starts_with("device-"));
        assert!(generate_device_id(&"x".repeat(200)).as_str().len() <= DeviceId::MAX_LEN);
    }

    #[test]
    fn device_id_is_stable_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = resolve_device_id(None, dir.path()).expect("generated");
        let second = resolve_device_id(None, dir.path()).expect("loaded");
        assert_eq!(first, second);
        let configured = DeviceId::new("fixed").expect("valid");
        assert_eq!(
            resolve_device_id(Some(&configured), dir.path()).expect("configured"),
            configured
        );
    }

    #[test]
    fn a_corrupt_stored_id_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DEVICE_ID_FILE), "a/b").expect("write");
        assert!(matches!(
            resolve_device_id(None, dir.path()),
            Err(ConfigError::InvalidStoredDeviceId { .. })
        ));
    }
}
