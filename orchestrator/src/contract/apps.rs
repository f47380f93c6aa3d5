use drover_shared::model::{AppSpec, RunState};
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An app: its spec, when it was defined and changed, and what it may do to
/// the devices it runs on (`AppSpec::privileges`; empty when unprivileged).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct App {
    pub spec: AppSpec,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default)]
    pub privileges: Vec<String>,
    /// The number of the release `spec` is.
    #[serde(default)]
    pub latest_release: u64,
    /// The selector of the app's fleet assignment, when it has one (what
    /// it covers: `GET /api/v1/apps/{name}/assignment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_selector: Option<String>,
}

/// One immutable, numbered version of an app's spec: every create or
/// change of the spec makes one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Release {
    pub number: u64,
    pub created_at_ms: u64,
    /// The name of who made it (an API token's name).
    pub author: String,
    pub spec: AppSpec,
}

/// The body of `POST /api/v1/devices/{id}/apps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub app: Name,
}

/// The body of `PUT /api/v1/apps/{name}/assignment`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRequest {
    /// A label selector (`env=prod,region in (eu,us)`); empty matches
    /// every device.
    pub selector: String,
    /// The release to run; absent or 0: the latest.
    #[serde(default)]
    pub release: u64,
    /// `running` (default) or `stopped`.
    #[serde(default = "running")]
    pub run: RunState,
}

fn running() -> RunState {
    RunState::Running
}

/// An app's fleet assignment and the devices it now covers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    pub app: Name,
    /// The selector in canonical form.
    pub selector: String,
    pub release: u64,
    pub run: RunState,
    pub updated_at_ms: u64,
    pub author: String,
    /// Devices whose labels match the selector now.
    pub matching: Vec<DeviceId>,
    /// Devices the assignment put the app on.
    pub assigned: Vec<DeviceId>,
    /// Matching devices that override it (a deploy or removal by hand).
    pub overridden: Vec<DeviceId>,
    /// Matching devices left without the app because an image of its
    /// release does not provide their platform (read from the registry
    /// when the assignment was made).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<DeviceId>,
}
