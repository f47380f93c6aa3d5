//! Edge jobs (issue 16): a run-to-completion container sent to the devices
//! a selector matches, each device's exit code and output tail collected.

use std::collections::BTreeMap;

use drover_shared::DeviceId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of `POST /api/v1/jobs`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// A label selector; empty matches every device.
    #[serde(default)]
    pub selector: String,
    pub image: String,
    /// The command and its arguments; empty runs the image's own.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How long a device may run it before it is killed (at most a day).
    pub timeout_secs: u64,
    /// At most this many devices running it at once; absent: all.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// A device that has not been sent the job by then (offline all along)
    /// is `expired`; absent: one day.
    #[serde(default)]
    pub expires_secs: Option<u64>,
}

/// Where a job is as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    Running,
    /// Every device succeeded.
    Succeeded,
    /// Every device is done and one failed, timed out or expired.
    Failed,
    Cancelled,
}

impl JobPhase {
    pub fn is_final(self) -> bool {
        self != JobPhase::Running
    }
}

/// Where a job is on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobDeviceState {
    /// Not sent yet (concurrency, or the device is offline).
    Pending,
    /// Sent, not yet answered.
    Dispatched,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// Never sent before the job expired.
    Expired,
}

impl JobDeviceState {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobDeviceState::Pending | JobDeviceState::Dispatched | JobDeviceState::Running
        )
    }
}

/// How many devices are in each state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobCounts {
    pub total: usize,
    pub pending: usize,
    pub dispatched: usize,
    pub running: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub cancelled: usize,
    pub expired: usize,
}

/// One device's part of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobDevice {
    pub device: DeviceId,
    pub state: JobDeviceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The last 4 KiB of its stdout and stderr.
    #[serde(default)]
    pub output_tail: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// When the orchestrator last sent it the job (0: never).
    #[serde(default)]
    pub dispatched_at_ms: u64,
    /// When its container started, by the device's clock (0: not yet).
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: u64,
}

/// A job and its progress on every device.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub selector: String,
    pub image: String,
    pub command: Vec<String>,
    /// Variable names only: values may be secrets.
    pub env_names: Vec<String>,
    pub timeout_secs: u64,
    pub concurrency: usize,
    pub phase: JobPhase,
    pub created_by: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    pub updated_at_ms: u64,
    pub counts: JobCounts,
    /// Per device, by id; empty in lists.
    #[serde(default)]
    pub devices: Vec<JobDevice>,
}
