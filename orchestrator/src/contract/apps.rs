use drover_shared::model::AppSpec;
use drover_shared::Name;
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
