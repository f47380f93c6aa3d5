use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error response: `{"error": {"status": 400, "message": "...", "field": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status, repeated for clients that only keep the body.
    pub status: u16,
    pub message: String,
    /// The offending field or parameter, by its path (`containers[0].image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
