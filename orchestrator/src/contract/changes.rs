use drover_shared::payload::{DeviceEvent, Telemetry};
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Operation;

/// One change in the fleet, as the engine publishes it to its subscribers
/// (`GET /api/v1/changes`, the CLI's `--wait`, and in time the console and
/// rules). A subscriber that falls behind gets [`Change::Lagged`] and reads
/// a snapshot again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A device came online or went offline.
    Device {
        device: DeviceId,
        online: bool,
        at_ms: u64,
    },
    /// A device sent a new inventory (`hello`).
    Inventory { device: DeviceId, at_ms: u64 },
    /// A device reported what runs, and which generation it has applied.
    State {
        device: DeviceId,
        desired_generation: u64,
        applied_generation: u64,
        at_ms: u64,
    },
    /// An operation was created or moved on.
    Operation { operation: Operation },
    /// A telemetry sample.
    Telemetry {
        device: DeviceId,
        telemetry: Telemetry,
    },
    /// Something a device did on its own.
    Event {
        device: DeviceId,
        event: DeviceEvent,
    },
    /// An app was created, changed or deleted.
    App { name: Name, deleted: bool },
    /// This subscriber fell behind and `missed` changes were dropped for
    /// it: what it holds may be stale, read a snapshot again.
    Lagged { missed: u64 },
}
