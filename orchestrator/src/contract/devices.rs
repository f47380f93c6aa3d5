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
    /// The OCI platform images must provide for it (`linux/arm/v7`): what
    /// its agent reports, or for an older agent what its `arch` tells
    /// (`x86_64`, `aarch64`). Absent when unknown: deploys to it are not
    /// checked against the image's platforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
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
    /// The labels selectors see: `device_labels` overlaid by
    /// `operator_labels` (the operator wins on a key both set).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Labels the device sets on itself (`drover-agent --label`).
    #[serde(default)]
    pub device_labels: BTreeMap<String, String>,
    /// Labels set through the API (`drover label`).
    #[serde(default)]
    pub operator_labels: BTreeMap<String, String>,
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

/// `PATCH /api/v1/devices/{id}/labels`: operator-set labels to set and
/// keys to remove, as `drover label DEVICE k=v k2-` does. A key may not be
/// in both.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelsPatch {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `PUT /api/v1/devices/{id}/labels`: the device's operator-set labels,
/// all of them (device-set labels are the device's own and stay).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelsPut {
    pub labels: BTreeMap<String, String>,
}
