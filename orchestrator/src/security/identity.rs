//! Who may use the broker: device credentials, enrollment tokens and
//! automation identities — the registry behind the embedded broker's
//! authentication hook and authorization rules ([`Authority`]).
//!
//! Every change is written to redb before it takes effect in memory, so
//! what the broker enforces is never ahead of what survives a restart.
//! The broker asks on every CONNECT; answers come from memory under a
//! read lock and never touch the disk.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use drover_broker::acl::{default_automation_subscribe, validate_grants};
use drover_broker::{Authority, Connections, Principal};
use drover_shared::identity::{AUTOMATION_PREFIX, ENROLL_USERNAME, ORCHESTRATOR_USERNAME};
use drover_shared::topic::Topics;
use drover_shared::{DeviceId, Name};
use subtle::ConstantTimeEq;
use tracing::info;

use crate::clock::now_ms;
use crate::contract::{CredentialState, Role};
use crate::core::records::{AutomationRecord, CredentialRecord, EnrollTokenRecord};
use crate::security::secret;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoreError, Write};

/// Prefix of enrollment tokens: `et.<id>.<secret>`.
pub const ENROLL_TOKEN_PREFIX: &str = "et";
/// Longest an enrollment token may live.
pub const MAX_ENROLL_TTL_SECS: u64 = 30 * 24 * 3600;
/// Most devices one enrollment token may enroll.
pub const MAX_ENROLL_USES: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Bad input, naming the field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an enrollment was refused. Shown to the agent; never contains the
/// token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollRefusal {
    #[error("enrollment token unknown or malformed")]
    Unknown,
    #[error("enrollment token expired")]
    Expired,
    #[error("enrollment token has no uses left")]
    UsedUp,
    #[error("enrollment token is for another device")]
    OtherDevice,
    #[error("device is already enrolled; re-enrolling needs a token created for this device")]
    AlreadyEnrolled,
    #[error("device is enrolled and its credential is active; an admin must revoke it before it can be re-enrolled")]
    StillActive,
    #[error("enrollment could not be stored")]
    Store,
}

#[derive(Default)]
struct State {
    devices: HashMap<DeviceId, CredentialRecord>,
    tokens: HashMap<String, EnrollTokenRecord>,
    automation: HashMap<String, AutomationRecord>,
}

pub struct Identities {
    writer: StoreWriter,
    topics: Topics,
    /// The orchestrator's own password on its embedded broker; new on
    /// every start, never stored.
    orchestrator_secret: String,
    state: RwLock<State>,
    /// Serialises changes so a check and the write it leads to cannot
    /// interleave with another change (a single-use token used twice).
    changes: tokio::sync::Mutex<()>,
    connections: OnceLock<Arc<Connections>>,
}

impl Identities {
    pub fn load(
        store: Store,
        writer: StoreWriter,
        topics: Topics,
    ) -> Result<Identities, StoreError> {
        let mut state = State::default();
        for c in store.credentials()? {
            state.devices.insert(c.device.clone(), c);
        }
        for t in store.enroll_tokens()? {
            state.tokens.insert(t.id.clone(), t);
        }
        for a in store.automation()? {
            state.automation.insert(a.name.as_str().to_string(), a);
        }
        Ok(Identities {
            writer,
            topics,
            orchestrator_secret: secret::generate(),
            state: RwLock::new(state),
            changes: tokio::sync::Mutex::new(()),
            connections: OnceLock::new(),
        })
    }

    pub fn orchestrator_secret(&self) -> &str {
        &self.orchestrator_secret
    }

    /// Lets revocation close open connections of the embedded broker.
    pub fn attach_connections(&self, connections: Arc<Connections>) {
        let _ = self.connections.set(connections);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    async fn persist(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.writer.persist(writes).await
    }

    pub fn credential_state(&self, device: &DeviceId) -> CredentialState {
        match self.read().devices.get(device) {
            None => CredentialState::None,
            Some(c) if c.revoked_at_ms.is_some() => CredentialState::Revoked,
            Some(_) => CredentialState::Active,
        }
    }

    // ---- enrollment tokens ----

    /// A new enrollment token; the returned string is its only copy.
    pub async fn create_enroll_token(
        &self,
        created_by: &str,
        ttl_secs: u64,
        uses: u32,
        device: Option<DeviceId>,
    ) -> Result<(EnrollTokenRecord, String), IdentityError> {
        if ttl_secs == 0 || ttl_secs > MAX_ENROLL_TTL_SECS {
            return Err(IdentityError::Invalid {
                field: "ttl_secs".into(),
                message: format!("must be between 1 and {MAX_ENROLL_TTL_SECS}"),
            });
        }
        if uses == 0 || uses > MAX_ENROLL_USES {
            return Err(IdentityError::Invalid {
                field: "uses".into(),
                message: format!("must be between 1 and {MAX_ENROLL_USES}"),
            });
        }
        let _g = self.changes.lock().await;
        let id = secret::short_id();
        let s = secret::generate();
        let now = now_ms();
        let rec = EnrollTokenRecord {
            id: id.clone(),
            secret_digest: secret::digest(&s),
            created_at_ms: now,
            created_by: created_by.to_string(),
            expires_at_ms: now + ttl_secs * 1000,
            uses_left: uses,
            device,
        };
        self.persist(vec![Write::EnrollToken(rec.clone())]).await?;
        self.write_state().tokens.insert(id.clone(), rec.clone());
        Ok((rec, secret::join_token(ENROLL_TOKEN_PREFIX, &id, &s)))
    }

    pub fn enroll_tokens(&self) -> Vec<EnrollTokenRecord> {
        let mut v: Vec<_> = self.read().tokens.values().cloned().collect();
        v.sort_by_key(|t| t.created_at_ms);
        v
    }

    pub async fn delete_enroll_token(&self, id: &str) -> Result<bool, IdentityError> {
        let _g = self.changes.lock().await;
        if !self.read().tokens.contains_key(id) {
            return Ok(false);
        }
        self.persist(vec![Write::DeleteEnrollToken(id.to_string())])
            .await?;
        self.write_state().tokens.remove(id);
        Ok(true)
    }

    /// Checks a token for `device` without using it up.
    fn check_token(
        &self,
        state: &State,
        device: &DeviceId,
        token: &str,
    ) -> Result<EnrollTokenRecord, EnrollRefusal> {
        let (id, s) =
            secret::split_token(token, ENROLL_TOKEN_PREFIX).ok_or(EnrollRefusal::Unknown)?;
        let rec = state.tokens.get(id).ok_or(EnrollRefusal::Unknown)?;
        if !secret::verify(s, &rec.secret_digest) {
            return Err(EnrollRefusal::Unknown);
        }
        if now_ms() >= rec.expires_at_ms {
            return Err(EnrollRefusal::Expired);
        }
        if rec.uses_left == 0 {
            return Err(EnrollRefusal::UsedUp);
        }
        match &rec.device {
            Some(d) if d != device => return Err(EnrollRefusal::OtherDevice),
            // Re-enrolling replaces the credential. A working one only an
            // admin's revocation may end: enrolling is an operator's right,
            // and must not take a device's identity away from it.
            Some(_) => {
                if state
                    .devices
                    .get(device)
                    .is_some_and(|c| c.revoked_at_ms.is_none())
                {
                    return Err(EnrollRefusal::StillActive);
                }
            }
            // A token for anyone must not take over an enrolled device's id.
            None => {
                // Nor bring back a revoked one: that takes a token made
                // for it, by someone who decided so.
                if state.devices.contains_key(device) {
                    return Err(EnrollRefusal::AlreadyEnrolled);
                }
            }
        }
        Ok(rec.clone())
    }

    /// Uses one enrollment of `token` and issues `device` a new password
    /// (replacing a previous, possibly revoked, credential when the token
    /// was made for this device).
    pub async fn enroll(&self, device: &DeviceId, token: &str) -> Result<String, EnrollRefusal> {
        let _g = self.changes.lock().await;
        let mut rec = self.check_token(&self.read(), device, token)?;
        rec.uses_left -= 1;
        let password = secret::generate();
        let cred = CredentialRecord {
            device: device.clone(),
            password_digest: secret::digest(&password),
            issued_at_ms: now_ms(),
            issued_via: format!("enrollment token {}", rec.id),
            revoked_at_ms: None,
        };
        self.persist(vec![
            Write::EnrollToken(rec.clone()),
            Write::Credential(cred.clone()),
        ])
        .await
        .map_err(|_| EnrollRefusal::Store)?;
        let mut st = self.write_state();
        st.tokens.insert(rec.id.clone(), rec);
        st.devices.insert(device.clone(), cred);
        Ok(password)
    }

    /// Issues a credential directly, for the agent the orchestrator runs
    /// in its own process (`serve --local-agent`).
    pub async fn issue_local(&self, device: &DeviceId) -> Result<String, IdentityError> {
        let _g = self.changes.lock().await;
        let password = secret::generate();
        let cred = CredentialRecord {
            device: device.clone(),
            password_digest: secret::digest(&password),
            issued_at_ms: now_ms(),
            issued_via: "local-agent".into(),
            revoked_at_ms: None,
        };
        self.persist(vec![Write::Credential(cred.clone())]).await?;
        self.write_state().devices.insert(device.clone(), cred);
        Ok(password)
    }

    /// Revokes a device's credential and closes its connection. `Ok(false)`
    /// when the device has no credential.
    pub async fn revoke(&self, device: &DeviceId) -> Result<bool, IdentityError> {
        let _g = self.changes.lock().await;
        let Some(mut cred) = self.read().devices.get(device).cloned() else {
            return Ok(false);
        };
        if cred.revoked_at_ms.is_none() {
            cred.revoked_at_ms = Some(now_ms());
            self.persist(vec![Write::Credential(cred.clone())]).await?;
            self.write_state().devices.insert(device.clone(), cred);
        }
        if let Some(c) = self.connections.get() {
            let kicked = c.kick_client(device.as_str());
            info!(device = %device, kicked, "device credential revoked");
        }
        Ok(true)
    }

    // ---- automation identities ----

    /// A new automation identity; the returned password is its only copy.
    /// Without explicit subscribe permissions it may read what devices
    /// report about themselves; without publish permissions, publish
    /// nothing.
    pub async fn create_automation(
        &self,
        created_by: &str,
        name: Name,
        role: Role,
        subscribe: Option<Vec<String>>,
        publish: Vec<String>,
    ) -> Result<(AutomationRecord, String), IdentityError> {
        if role == Role::Admin {
            return Err(IdentityError::Invalid {
                field: "role".into(),
                message: "an automation identity is a viewer or an operator, never an admin".into(),
            });
        }
        let subscribe = subscribe.unwrap_or_else(|| default_automation_subscribe(&self.topics));
        validate_grants(&self.topics, &subscribe, &publish).map_err(|e| {
            IdentityError::Invalid {
                field: e.field,
                message: e.message,
            }
        })?;
        let _g = self.changes.lock().await;
        if self.read().automation.contains_key(name.as_str()) {
            return Err(IdentityError::Exists(format!("automation identity {name}")));
        }
        let password = secret::generate();
        let rec = AutomationRecord {
            name: name.clone(),
            password_digest: secret::digest(&password),
            role,
            subscribe,
            publish,
            created_at_ms: now_ms(),
            created_by: created_by.to_string(),
        };
        self.persist(vec![Write::Automation(rec.clone())]).await?;
        self.write_state()
            .automation
            .insert(name.as_str().to_string(), rec.clone());
        Ok((rec, password))
    }

    pub fn automation(&self) -> Vec<AutomationRecord> {
        let mut v: Vec<_> = self.read().automation.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The role of the automation identity `name`, if it exists.
    pub fn automation_role(&self, name: &str) -> Option<Role> {
        self.read().automation.get(name).map(|a| a.role)
    }

    /// Deletes an automation identity and closes its connections.
    pub async fn delete_automation(&self, name: &str) -> Result<bool, IdentityError> {
        let _g = self.changes.lock().await;
        if !self.read().automation.contains_key(name) {
            return Ok(false);
        }
        self.persist(vec![Write::DeleteAutomation(name.to_string())])
            .await?;
        self.write_state().automation.remove(name);
        if let Some(c) = self.connections.get() {
            c.kick_user(&format!("{AUTOMATION_PREFIX}{name}"));
        }
        Ok(true)
    }
}

impl Authority for Identities {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        if username == ORCHESTRATOR_USERNAME {
            return password
                .as_bytes()
                .ct_eq(self.orchestrator_secret.as_bytes())
                .into();
        }
        let st = self.read();
        if username == ENROLL_USERNAME {
            return DeviceId::new(client_id)
                .is_ok_and(|d| self.check_token(&st, &d, password).is_ok());
        }
        if let Some(name) = username.strip_prefix(AUTOMATION_PREFIX) {
            return st
                .automation
                .get(name)
                .is_some_and(|a| secret::verify(password, &a.password_digest));
        }
        // A device: username and client id are both its id.
        if username != client_id {
            return false;
        }
        let Ok(device) = DeviceId::new(username) else {
            return false;
        };
        st.devices.get(&device).is_some_and(|c| {
            c.revoked_at_ms.is_none() && secret::verify(password, &c.password_digest)
        })
    }

    fn principal(&self, client_id: &str, username: Option<&str>) -> Option<Principal> {
        let username = username?;
        if username == ORCHESTRATOR_USERNAME {
            return Some(Principal::Owner);
        }
        if username == ENROLL_USERNAME {
            return DeviceId::new(client_id).ok().map(Principal::Enrolling);
        }
        if let Some(name) = username.strip_prefix(AUTOMATION_PREFIX) {
            return self
                .read()
                .automation
                .get(name)
                .map(|a| Principal::Automation {
                    name: name.to_string(),
                    subscribe: a.subscribe.clone(),
                    publish: a.publish.clone(),
                });
        }
        if username != client_id {
            return None;
        }
        let device = DeviceId::new(username).ok()?;
        self.read()
            .devices
            .get(&device)
            .filter(|c| c.revoked_at_ms.is_none())
            .map(|_| Principal::Device(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(store: Store) -> Identities {
        let writer = StoreWriter::spawn(store.clone(), Arc::default());
        Identities::load(store, writer, Topics::default()).expect("load")
    }

    /// Opens the store again once the previous writer task has let go of
    /// it (it ends when the last handle is dropped).
    async fn reopen(path: &std::path::Path) -> Store {
        for _ in 0..200 {
            if let Ok(s) = Store::open(path) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Store::open(path).expect("store reopens")
    }

    fn ids() -> (tempfile::TempDir, Identities) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("d.redb")).expect("store");
        (dir, load(store))
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }

    #[tokio::test]
    async fn a_token_enrolls_once_and_the_credential_authenticates() {
        let (_d, ids) = ids();
        let (_, token) = ids
            .create_enroll_token("admin", 60, 1, None)
            .await
            .expect("token");
        assert!(ids.authenticate("pi", ENROLL_USERNAME, &token));
        let pw = ids.enroll(&dev("pi"), &token).await.expect("enrolled");
        assert!(ids.authenticate("pi", "pi", &pw));
        assert!(!ids.authenticate("pi", "pi", "wrong"));
        assert!(
            !ids.authenticate("other", "pi", &pw),
            "client id must be the device id"
        );
        assert_eq!(
            ids.principal("pi", Some("pi")),
            Some(Principal::Device(dev("pi")))
        );
        // Used up.
        assert!(!ids.authenticate("pi2", ENROLL_USERNAME, &token));
        assert_eq!(
            ids.enroll(&dev("pi2"), &token).await,
            Err(EnrollRefusal::UsedUp)
        );
    }

    #[tokio::test]
    async fn revocation_refuses_and_only_a_pinned_token_re_enrolls() {
        let (_d, ids) = ids();
        let pw = ids.issue_local(&dev("pi")).await.expect("issued");
        let (_, early) = ids
            .create_enroll_token("a", 60, 1, Some(dev("pi")))
            .await
            .expect("t");
        assert_eq!(
            ids.enroll(&dev("pi"), &early).await,
            Err(EnrollRefusal::StillActive),
            "a pinned token took an active device's identity"
        );
        assert!(!ids.authenticate("pi", ENROLL_USERNAME, &early));
        assert!(
            ids.authenticate("pi", "pi", &pw),
            "the device keeps its credential"
        );
        assert!(ids.revoke(&dev("pi")).await.expect("revoked"));
        assert!(!ids.authenticate("pi", "pi", &pw));
        assert_eq!(ids.principal("pi", Some("pi")), None);
        assert_eq!(ids.credential_state(&dev("pi")), CredentialState::Revoked);
        let (_, any) = ids.create_enroll_token("a", 60, 5, None).await.expect("t");
        assert_eq!(
            ids.enroll(&dev("pi"), &any).await,
            Err(EnrollRefusal::AlreadyEnrolled)
        );
        let (_, pinned) = ids
            .create_enroll_token("a", 60, 1, Some(dev("pi")))
            .await
            .expect("t");
        assert_eq!(
            ids.enroll(&dev("other"), &pinned).await,
            Err(EnrollRefusal::OtherDevice)
        );
        let pw2 = ids.enroll(&dev("pi"), &pinned).await.expect("re-enrolled");
        assert!(ids.authenticate("pi", "pi", &pw2));
        assert_eq!(ids.credential_state(&dev("pi")), CredentialState::Active);
    }

    #[tokio::test]
    async fn state_survives_a_restart_but_the_orchestrator_secret_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.redb");
        let (pw, token, old_secret) = {
            let ids = load(Store::open(&path).expect("s"));
            let pw = ids.issue_local(&dev("pi")).await.expect("issued");
            let (_, token) = ids.create_enroll_token("a", 60, 2, None).await.expect("t");
            (pw, token, ids.orchestrator_secret().to_string())
        };
        let ids = load(reopen(&path).await);
        assert!(ids.authenticate("pi", "pi", &pw));
        assert!(ids.authenticate("new", ENROLL_USERNAME, &token));
        assert!(!ids.authenticate("x", ORCHESTRATOR_USERNAME, &old_secret));
        assert!(ids.authenticate("x", ORCHESTRATOR_USERNAME, ids.orchestrator_secret()));
    }

    #[tokio::test]
    async fn bad_token_settings_and_tokens_are_refused() {
        let (_d, ids) = ids();
        assert!(ids.create_enroll_token("a", 0, 1, None).await.is_err());
        assert!(ids.create_enroll_token("a", 60, 0, None).await.is_err());
        assert!(ids
            .create_enroll_token("a", MAX_ENROLL_TTL_SECS + 1, 1, None)
            .await
            .is_err());
        for t in ["", "et", "et.x.y", "garbage", "at.a.b"] {
            assert!(!ids.authenticate("pi", ENROLL_USERNAME, t), "{t}");
        }
        assert!(!ids.authenticate("", "", ""));
        assert!(!ids.authenticate("$orchestrator", "$orchestrator", ""));
    }

    #[tokio::test]
    async fn automation_identities_get_explicit_permissions() {
        let (_d, ids) = ids();
        let name = Name::new("nodered").expect("n");
        let (_, pw) = ids
            .create_automation("admin", name, Role::Viewer, None, vec![])
            .await
            .expect("created");
        assert!(ids.authenticate("any-client", "$auto:nodered", &pw));
        assert!(!ids.authenticate("any-client", "$auto:nodered", "nope"));
        match ids.principal("c", Some("$auto:nodered")) {
            Some(Principal::Automation {
                subscribe, publish, ..
            }) => {
                assert!(subscribe.iter().any(|f| f.ends_with("/telemetry")));
                assert!(publish.is_empty());
            }
            other => panic!("unexpected principal {other:?}"),
        }
        let bad = ids
            .create_automation(
                "admin",
                Name::new("x").expect("n"),
                Role::Operator,
                None,
                vec!["#".into()],
            )
            .await;
        assert!(matches!(bad, Err(IdentityError::Invalid { .. })));
        let admin = ids
            .create_automation(
                "admin",
                Name::new("y").expect("n"),
                Role::Admin,
                None,
                vec![],
            )
            .await;
        assert!(
            matches!(&admin, Err(IdentityError::Invalid { field, .. }) if field == "role"),
            "{admin:?}"
        );
        assert_eq!(ids.automation_role("nodered"), Some(Role::Viewer));
        assert_eq!(ids.automation_role("y"), None);
        assert!(ids.delete_automation("nodered").await.expect("deleted"));
        assert!(!ids.authenticate("any-client", "$auto:nodered", &pw));
    }
}
