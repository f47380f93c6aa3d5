use std::collections::BTreeMap;

use drover_shared::model::{DesiredState, ObservedState};
use drover_shared::payload::{DeviceEvent, Heartbeat, Hello, Telemetry};
use drover_shared::DeviceId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A device: online or not, what it is, what it should run and what runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Device {
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
    /// name (empty lists for unprivileged apps).
    #[serde(default)]
    pub privileges: BTreeMap<String, Vec<String>>,
    /// Its broker credential: none, active or revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialState>,
}

/// A device's broker credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    None,
    Active,
    Revoked,
}

/// The answer to `POST /api/v1/devices/{id}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevokeResponse {
    pub device: DeviceId,
    pub credential: CredentialState,
}
