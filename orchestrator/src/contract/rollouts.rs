//! Rollouts (issue 13): a release reaches the devices a selector matches,
//! batch by batch. `POST/GET /api/v1/rollouts`, `GET /api/v1/rollouts/{id}`,
//! `GET /api/v1/rollouts/{id}/devices`, `POST /api/v1/rollouts/{id}/{action}`.

use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// A batch size: a device count (`3`) or a percentage of all the
/// rollout's devices (`"50%"`, rounded down, at least one device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSize {
    Count(u32),
    Percent(u8),
}

impl BatchSize {
    /// How many of `total` devices this is: a percentage rounds down (at
    /// least 1), so a batch never exceeds the share the operator named.
    pub fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Count(n) => n as usize,
            BatchSize::Percent(p) => (total * p as usize / 100).max(1),
        }
    }
}

impl Serialize for BatchSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSize::Count(n) => s.serialize_u32(*n),
            BatchSize::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        let Some(num) = v.strip_suffix('%') else {
            return Err(format!(
                "a batch size is a device count (3) or a percentage (\"50%\"), got {v:?}"
            ));
        };
        match num.trim().parse::<u32>() {
            Ok(p @ 1..=100) => Ok(BatchSize::Percent(p as u8)),
            _ => Err(format!("a percentage must be 1% to 100%, got {v:?}")),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = BatchSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a device count (3) or a percentage (\"50%\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<BatchSize, E> {
                match u32::try_from(v) {
                    Ok(0) => Err(E::custom("a device count must be at least 1, got 0")),
                    Ok(n) => Ok(BatchSize::Count(n)),
                    Err(_) => Err(E::custom(format!(
                        "a device count must be at most {}, got {v}",
                        u32::MAX
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<BatchSize, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "a device count must be at least 1, got {v}"
                    ))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BatchSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for BatchSize {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .description(Some("a device count")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^(100|[1-9][0-9]?)%$"))
                    .description(Some(
                        "a percentage of the rollout's devices, rounded down, at least one",
                    )),
            )
            .into()
    }
}

impl ToSchema for BatchSize {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("BatchSize")
    }
}

/// What a rollout does when a batch can no longer reach its success
/// threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Put every device it touched back on the release it ran before.
    #[default]
    Rollback,
    /// Stop starting devices until an operator resumes (or rolls back).
    Pause,
    /// Go on; the rollout ends `failed` if any device failed.
    Continue,
}

/// The body of `POST /api/v1/rollouts`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// The app to roll out (with `release`); or, instead, `agent_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<Name>,
    /// Roll an agent version (`/api/v1/agent-releases`) out instead of an
    /// app: each device gets that version's binary for its architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// A label selector; empty matches every device.
    #[serde(default)]
    pub selector: String,
    /// The release to roll out; absent or 0: the latest.
    #[serde(default)]
    pub release: u64,
    /// Batch sizes in order; the first is the canary, the last batch takes
    /// the devices left. Empty: one batch of every device.
    #[serde(default)]
    pub batches: Vec<BatchSize>,
    /// At most this many devices updating at once; absent: no limit.
    #[serde(default)]
    pub max_unavailable: Option<BatchSize>,
    /// Share of a batch's devices that must end updated (default 100).
    #[serde(default = "hundred")]
    pub success_threshold_percent: u8,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How long a device may take to run the release and become ready.
    #[serde(default = "default_timeout")]
    pub device_timeout_secs: u64,
    /// How long a device must stay ready to count as updated.
    #[serde(default)]
    pub min_ready_secs: u64,
    /// Wait for an operator's approval between batches.
    #[serde(default)]
    pub approval: bool,
}

fn hundred() -> u8 {
    100
}

fn default_timeout() -> u64 {
    600
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    Running,
    WaitingApproval,
    Paused,
    RollingBack,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
    Superseded,
}

/// Where one device of a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutDeviceState {
    Pending,
    Updating,
    /// Ready, not yet for the minimum ready time.
    Ready,
    Updated,
    Failed,
    RollingBack,
    RolledBack,
    /// Deleted or left the selector during the rollout.
    Skipped,
}

/// The device counts of one batch (or of the whole rollout).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolloutCounts {
    pub total: usize,
    pub pending: usize,
    /// Updating, or ready for less than the minimum ready time.
    pub updating: usize,
    pub updated: usize,
    pub failed: usize,
    pub skipped: usize,
    pub rolling_back: usize,
    pub rolled_back: usize,
}

/// A rollout and its progress.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    pub id: String,
    /// The app rolled out; `agent` for an agent rollout.
    pub app: Name,
    /// For an agent rollout: the agent version rolled out (the releases are
    /// agent release numbers, 0: the packaged binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    pub selector: String,
    /// The release most of its devices ran before (0: none had the app).
    pub from_release: u64,
    pub to_release: u64,
    pub phase: RolloutPhase,
    pub created_at_ms: u64,
    /// The name of who created it (an API token's name).
    pub author: String,
    /// The batch running (or next, while waiting for approval).
    pub current_batch: usize,
    /// Per batch, in order.
    pub batches: Vec<RolloutCounts>,
    /// Every batch added up.
    pub counts: RolloutCounts,
    /// Updated devices, percent of those not skipped.
    pub percent: u8,
    pub on_failure: OnFailure,
    pub approval: bool,
    pub updated_at_ms: u64,
    /// When it reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Why it stopped, paused or rolled back, in words (who asked, or which
    /// batch failed its threshold and by how much).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RolloutPhase {
    /// Succeeded, failed, rolled back, aborted or superseded: nothing more
    /// will happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutPhase::Succeeded
                | RolloutPhase::Failed
                | RolloutPhase::RolledBack
                | RolloutPhase::Aborted
                | RolloutPhase::Superseded
        )
    }
}

/// An operator's action on a rollout: `POST /api/v1/rollouts/{id}/{action}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    Pause,
    Resume,
    Approve,
    Abort,
    Rollback,
}

impl RolloutAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Approve => "approve",
            RolloutAction::Abort => "abort",
            RolloutAction::Rollback => "rollback",
        }
    }
}

impl std::str::FromStr for RolloutAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pause" => RolloutAction::Pause,
            "resume" => RolloutAction::Resume,
            "approve" => RolloutAction::Approve,
            "abort" => RolloutAction::Abort,
            "rollback" => RolloutAction::Rollback,
            _ => {
                return Err(format!(
                    "unknown rollout action {s:?}: pause, resume, approve, abort or rollback"
                ))
            }
        })
    }
}

/// One device of a rollout.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RolloutDevice {
    pub device: DeviceId,
    pub batch: usize,
    pub state: RolloutDeviceState,
    /// Why it failed, when it did (also once rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
