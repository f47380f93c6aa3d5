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
}
