use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An uploaded agent binary (`/api/v1/agent-releases`). One version may
/// have a binary per architecture; each has its own digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentRelease {
    /// The version it was uploaded as.
    pub version: String,
    /// The number rollouts use for this version (every binary of one
    /// version has the same), from 1.
    pub release: u64,
    /// Rust's name of the architecture, from the ELF header: `x86_64`,
    /// `aarch64` or `arm`.
    pub arch: String,
    /// SHA-256 of the binary, lowercase hex.
    pub digest: String,
    pub size: u64,
    pub uploaded_by: String,
    pub created_ms: u64,
}
