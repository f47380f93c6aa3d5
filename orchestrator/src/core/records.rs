//! What the orchestrator stores and serves: records in redb and the JSON
//! views of the REST API.

use drover_shared::model::{AppSpec, DesiredState, ObservedState};
use drover_shared::payload::{DeviceEvent, Heartbeat, Hello, Op, Progress, Telemetry};
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub online: bool,
    #[serde(default)]
    pub inventory: Option<Hello>,
    #[serde(default)]
    pub observed: Option<ObservedState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    pub spec: AppSpec,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// An app as the API shows it: the stored record and what the app may do
/// to the devices it runs on ([`AppSpec::privileges`]; empty when it is
/// unprivileged).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppView {
    #[serde(flatten)]
    pub record: AppRecord,
    #[serde(default)]
    pub privileges: Vec<String>,
}

impl From<AppRecord> for AppView {
    fn from(record: AppRecord) -> Self {
        AppView {
            privileges: record.spec.privileges(),
            record,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DesiredRecord {
    pub device: DeviceId,
    pub state: DesiredState,
}

/// A request to change one device, followed from issue to final outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub device: DeviceId,
    pub app: Name,
    pub op: Op,
    /// The desired-state generation this operation produced.
    pub generation: u64,
    pub status: OpStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// Stored; not yet handed to the broker.
    Pending,
    /// Published to the device.
    Sent,
    /// The device acknowledged it.
    Received,
    /// The device is working on it (pulling, starting, …).
    InProgress,
    Succeeded,
    Failed,
    /// A later change to the same device replaced it before it finished.
    Superseded,
}

impl OpStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpStatus::Succeeded | OpStatus::Failed | OpStatus::Superseded
        )
    }
}

/// A device as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub online: bool,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub desired_generation: u64,
    pub applied_generation: u64,
    #[serde(default)]
    pub inventory: Option<Hello>,
    #[serde(default)]
    pub desired: Option<DesiredState>,
    #[serde(default)]
    pub observed: Option<ObservedState>,
    #[serde(default)]
    pub heartbeat: Option<Heartbeat>,
    #[serde(default)]
    pub telemetry: Option<Telemetry>,
    /// The device's latest events, newest first.
    #[serde(default)]
    pub recent_events: Vec<DeviceEvent>,
    /// What each app in the desired state may do to the device, by app
    /// name ([`AppSpec::privileges`]; empty lists for unprivileged apps).
    #[serde(default)]
    pub privileges: std::collections::BTreeMap<String, Vec<String>>,
    /// Its broker credential: none, active or revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<crate::security::identity::CredentialState>,
}

/// A device's broker credential. Only the digest of the password is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub device: DeviceId,
    pub password_digest: String,
    pub issued_at_ms: u64,
    /// How it was issued: the enrollment token's id, or "local-agent".
    pub issued_via: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// An enrollment token. The token itself is shown once, at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub secret_digest: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: u64,
    /// Enrollments this token may still make.
    pub uses_left: u32,
    /// When set, only this device id may enroll with it, and it may
    /// replace that device's existing credential (re-enrollment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
}

/// An automation identity for the broker, with explicit permissions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutomationRecord {
    pub name: Name,
    pub password_digest: String,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    pub created_at_ms: u64,
    pub created_by: String,
}

/// A REST API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: Name,
    pub role: crate::security::access::Role,
    pub secret_digest: String,
    pub created_at_ms: u64,
    pub created_by: String,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: u64,
    /// The API token's name, `device:<id>` for MQTT enrollment, or
    /// `anonymous` when no valid credential was presented.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::security::access::Role>,
    /// e.g. `POST /api/v1/devices/pi-1/apps` or `mqtt enroll`.
    pub action: String,
    /// `ok`, `denied` (401/403) or `failed`.
    pub outcome: String,
    /// HTTP status for API calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}
