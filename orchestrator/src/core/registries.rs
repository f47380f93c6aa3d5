//! Private registry credentials: validation, the stored record, its API view
//! (which never carries the password), and the book that decides which
//! device gets which credentials on its `secrets` topic. No I/O: `service`
//! stores and publishes what this module decides.
//!
//! A device gets the credentials for exactly the registries its desired
//! apps pull from, computed from the image references in its desired state.
//! The credentials travel on their own retained topic, never inside the
//! desired state, so they stay out of the `desired` table, operation
//! records, acks and every view of the desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::contract::{self, RegistryCredentials};
use crate::core::records::RegistryRecord;
use drover_shared::model::{DesiredState, ImageRef};
use drover_shared::payload::{RegistryCredential, Secrets};
use drover_shared::DeviceId;

/// Longest host, username or password accepted, so a device's `secrets`
/// payload stays far below the protocol's size limit.
const MAX_LEN: usize = 1024;

/// Bad input, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidCredentials {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidCredentials {
    InvalidCredentials {
        field,
        message: message.into(),
    }
}

/// Checks a registry host as it appears in image references
/// (`registry.example.com`, `127.0.0.1:5001`, `[::1]:5000`) and returns it
/// in lower case: no scheme, no path, no credentials in it.
pub fn validate_host(raw: &str) -> Result<String, InvalidCredentials> {
    if raw.is_empty() {
        return Err(invalid("host", "must not be empty"));
    }
    if raw.len() > 255 {
        return Err(invalid("host", "is longer than 255 characters"));
    }
    if raw.contains("://") {
        return Err(invalid(
            "host",
            format!(
                "{raw:?} has a scheme; give the host as in image references, e.g. 127.0.0.1:5001"
            ),
        ));
    }
    if raw.contains('/') {
        return Err(invalid(
            "host",
            format!("{raw:?} has a path; give only host[:port]"),
        ));
    }
    if let Some(c) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
    {
        return Err(invalid(
            "host",
            format!(
                "{raw:?} contains {c:?}; a host is letters, digits, '.', '-', ':' and [ ] for IPv6"
            ),
        ));
    }
    if raw.starts_with(['.', '-', ':']) || raw.ends_with(['.', '-', ':']) {
        return Err(invalid("host", format!("{raw:?} is not a host[:port]")));
    }
    // `host:port`: the port must be a port; IPv6 literals are bracketed.
    let port = match raw.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') && h.contains(':') => {
            return Err(invalid(
                "host",
                format!("{raw:?}: write an IPv6 address in brackets, e.g. [::1]:{p}"),
            ));
        }
        Some((_, p)) if !p.contains(']') => Some(p),
        _ => None,
    };
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |n| n == 0) {
            return Err(invalid(
                "host",
                format!("{raw:?}: port {p:?} is not 1-65535"),
            ));
        }
    }
    Ok(raw.to_ascii_lowercase())
}

/// Checks a `PUT` body.
pub fn validate_credentials(body: &RegistryCredentials) -> Result<(), InvalidCredentials> {
    if body.username.is_empty() {
        return Err(invalid("username", "must not be empty"));
    }
    if body.username.len() > MAX_LEN {
        return Err(invalid(
            "username",
            format!("is longer than {MAX_LEN} characters"),
        ));
    }
    if body.username.contains(':') || body.username.chars().any(char::is_control) {
        return Err(invalid(
            "username",
            "must not contain ':' or control characters",
        ));
    }
    if body.password.is_empty() {
        return Err(invalid("password", "must not be empty"));
    }
    if body.password.len() > MAX_LEN {
        return Err(invalid(
            "password",
            format!("is longer than {MAX_LEN} characters"),
        ));
    }
    Ok(())
}

/// The registry hosts a desired state pulls from.
pub fn needed_hosts(desired: &DesiredState) -> BTreeSet<String> {
    desired
        .apps
        .iter()
        .flat_map(|a| &a.spec.containers)
        .filter_map(|c| ImageRef::parse(&c.image).ok())
        .map(|r| r.registry_host())
        .collect()
}

/// Stored credentials and what each device was last sent.
#[derive(Debug, Default)]
pub struct SecretsBook {
    by_host: BTreeMap<String, RegistryRecord>,
    /// The registries (and credentials) each device was last sent, so an
    /// unchanged set is not published again.
    sent: HashMap<DeviceId, Vec<RegistryCredential>>,
}

impl SecretsBook {
    pub fn load(records: Vec<RegistryRecord>) -> SecretsBook {
        SecretsBook {
            by_host: records
                .into_iter()
                .map(|r| (r.credential.host.clone(), r))
                .collect(),
            sent: HashMap::new(),
        }
    }

    pub fn views(&self) -> Vec<contract::Registry> {
        self.by_host
            .values()
            .map(contract::Registry::from)
            .collect()
    }

    pub fn view(&self, host: &str) -> Option<contract::Registry> {
        self.by_host.get(host).map(contract::Registry::from)
    }

    /// The stored credentials for a host.
    pub fn record(&self, host: &str) -> Option<RegistryRecord> {
        self.by_host.get(host).cloned()
    }

    pub fn put(&mut self, rec: RegistryRecord) {
        self.by_host.insert(rec.credential.host.clone(), rec);
    }

    pub fn remove(&mut self, host: &str) -> bool {
        self.by_host.remove(host).is_some()
    }

    /// The credentials a device with this desired state needs, sorted by host.
    pub fn for_desired(&self, desired: &DesiredState) -> Vec<RegistryCredential> {
        needed_hosts(desired)
            .iter()
            .filter_map(|h| self.by_host.get(h))
            .map(|r| r.credential.clone())
            .collect()
    }

    /// The `secrets` payload to publish to a device, or `None` when it was
    /// already sent exactly that set (`force` sends it anyway, e.g. to a
    /// broker that lost its retained messages). Records it as sent; call
    /// [`SecretsBook::unsend`] if the publish then fails.
    pub fn next_for(
        &mut self,
        device: &DeviceId,
        desired: &DesiredState,
        force: bool,
        now_ms: u64,
    ) -> Option<Secrets> {
        let registries = self.for_desired(desired);
        if !force && self.sent.get(device) == Some(&registries) {
            return None;
        }
        self.sent.insert(device.clone(), registries.clone());
        Some(Secrets {
            issued_at_ms: now_ms,
            registries,
        })
    }

    /// Forgets what a device was sent, so the next sync sends it again.
    pub fn unsend(&mut self, device: &DeviceId) {
        self.sent.remove(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::model::{AppSpec, DesiredApp, RunState};

    fn desired(images: &[&str]) -> DesiredState {
        let spec: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "containers": images.iter().enumerate()
                .map(|(i, im)| serde_json::json!({"name": format!("c{i}"), "image": im}))
                .collect::<Vec<_>>(),
        }))
        .expect("spec");
        DesiredState {
            generation: 1,
            apps: vec![DesiredApp {
                spec,
                run: RunState::Running,
                started_at: 1,
                release: 0,
                restarted_at: 0,
            }],
            agent: None,
        }
    }

    fn record(host: &str, password: &str) -> RegistryRecord {
        RegistryRecord {
            credential: RegistryCredential {
                host: host.into(),
                username: "robot".into(),
                password: password.into(),
            },
            updated_at_ms: 1,
        }
    }

    #[test]
    fn hosts_are_validated_by_name() {
        for ok in [
            "127.0.0.1:5001",
            "Registry.Example.com",
            "localhost",
            "[::1]:5000",
        ] {
            assert_eq!(
                validate_host(ok).as_deref(),
                Ok(ok.to_ascii_lowercase().as_str())
            );
        }
        for bad in [
            "",
            "http://127.0.0.1:5001",
            "127.0.0.1:5001/v2",
            "user@host",
            "host:0",
            "host:99999",
            "host:",
            "::1",
            "a b",
        ] {
            assert_eq!(
                validate_host(bad).map_err(|e| e.field),
                Err("host"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn credentials_are_validated_by_name() {
        let body = |u: &str, p: &str| RegistryCredentials {
            username: u.into(),
            password: p.into(),
        };
        assert_eq!(validate_credentials(&body("robot", "pw")), Ok(()));
        let field = |b| validate_credentials(&b).map_err(|e| e.field);
        assert_eq!(field(body("", "pw")), Err("username"));
        assert_eq!(field(body("a:b", "pw")), Err("username"));
        assert_eq!(field(body("robot", "")), Err("password"));
        assert!(!format!("{:?}", body("robot", "s3cr3t-pw")).contains("s3cr3t"));
    }

    #[test]
    fn a_device_gets_only_the_registries_its_apps_pull_from() {
        let mut book = SecretsBook::load(vec![
            record("127.0.0.1:5001", "a"),
            record("registry.example.com", "b"),
        ]);
        let dev = DeviceId::new("pi").expect("id");
        let d = desired(&["127.0.0.1:5001/x:1", "127.0.0.1:5000/y:1", "busybox:1"]);
        let s = book.next_for(&dev, &d, false, 10).expect("first time");
        assert_eq!(s.hosts(), ["127.0.0.1:5001"]);
        assert_eq!(s.issued_at_ms, 10);
        assert_eq!(book.next_for(&dev, &d, false, 11), None, "unchanged");
        assert!(book.next_for(&dev, &d, true, 12).is_some(), "forced");

        // A changed password is sent again; so is a removal, as an empty set.
        book.put(record("127.0.0.1:5001", "new"));
        let s = book.next_for(&dev, &d, false, 13).expect("changed");
        assert_eq!(s.registries[0].password, "new");
        assert!(book.remove("127.0.0.1:5001"));
        let s = book.next_for(&dev, &d, false, 14).expect("removed");
        assert!(s.registries.is_empty());

        // Another device without those images gets nothing to pull with.
        let other = DeviceId::new("other").expect("id");
        let s = book
            .next_for(&other, &desired(&["127.0.0.1:5000/y:1"]), false, 15)
            .expect("first time");
        assert!(s.registries.is_empty());

        book.unsend(&other);
        assert!(book
            .next_for(&other, &desired(&["127.0.0.1:5000/y:1"]), false, 16)
            .is_some());
    }

    #[test]
    fn views_never_carry_the_password() {
        let book = SecretsBook::load(vec![record("127.0.0.1:5001", "s3cr3t-pw")]);
        let text = serde_json::to_string(&book.views()).expect("json");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("\"password_set\":true"), "{text}");
        assert!(!format!("{book:?}").contains("s3cr3t"));
    }
}
