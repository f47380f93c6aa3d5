use drover_shared::payload::{Op, Progress};
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A request to change one device, followed from issue to final outcome.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Pending => "pending",
            OpStatus::Sent => "sent",
            OpStatus::Received => "received",
            OpStatus::InProgress => "in_progress",
            OpStatus::Succeeded => "succeeded",
            OpStatus::Failed => "failed",
            OpStatus::Superseded => "superseded",
        }
    }
}
