use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How finely a telemetry series is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Resolution {
    /// Every sample the device sent, as it sent it.
    #[serde(rename = "raw")]
    Raw,
    /// One point per five minutes: the average and the maximum of the
    /// samples in it.
    #[serde(rename = "5m")]
    FiveMinutes,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Raw => "raw",
            Resolution::FiveMinutes => "5m",
        }
    }
}

/// The answer to `GET /api/v1/devices/{id}/telemetry`: a device's telemetry
/// over a window, oldest point first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TelemetrySeries {
    pub device: DeviceId,
    /// The resolution of `points` (what `auto` chose, when asked for it).
    pub resolution: Resolution,
    /// The window asked for, both ends included.
    pub since_ms: u64,
    pub until_ms: u64,
    pub points: Vec<TelemetryPoint>,
    /// Set when the window holds more points than one response carries:
    /// ask again with `since_ms` set to this for the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_since_ms: Option<u64>,
}

/// One point of a series: a sample (raw) or the samples of one bucket
/// (`at_ms` is the bucket's start). For a raw point `avg` and `max` are
/// the sample's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TelemetryPoint {
    pub at_ms: u64,
    /// How many samples the point stands for.
    pub samples: u32,
    pub host: HostPoint,
    pub containers: Vec<ContainerPoint>,
}

/// The host's metrics in one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostPoint {
    pub cpu_percent: Stat,
    pub memory_used_bytes: Stat,
    /// As last reported in the point.
    pub memory_total_bytes: u64,
    pub disk_used_bytes: Stat,
    /// As last reported in the point.
    pub disk_total_bytes: u64,
}

/// One container's metrics in one point. A container that ran for part
/// of a bucket has fewer `samples` than the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContainerPoint {
    pub app: Name,
    pub container: Name,
    pub samples: u32,
    /// Percent of one core, as `docker stats` shows it.
    pub cpu_percent: Stat,
    pub memory_bytes: Stat,
}

/// The average and the maximum of a metric over a point's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stat {
    pub avg: f64,
    pub max: f64,
}
