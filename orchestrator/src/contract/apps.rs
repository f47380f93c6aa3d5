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
}

/// The body of `POST /api/v1/devices/{id}/apps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub app: Name,
}
