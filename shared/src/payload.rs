//! One payload type per topic kind. Timestamps are Unix milliseconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::Message;
use crate::ids::Name;
use crate::model::{DesiredState, ObservedState};
use crate::platform::Platform;
use crate::topic::TopicKind;

/// `hello`: who the device is and what it has. Sent on every connect.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Hello {
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    /// Rust's name of the agent's architecture (`x86_64`, `aarch64`, `arm`).
    pub arch: String,
    /// The OCI platform the agent pulls images for (`linux/arm/v7`): the
    /// one its build targets. Absent from agents before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// Empty when the Docker daemon could not be reached; see `docker_error`.
    pub docker_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_error: Option<String>,
    /// `repo:tag` of every image present on the device.
    pub images: Vec<String>,
    pub booted_at_ms: u64,
    /// Labels the device sets on itself (`drover-agent --label k=v`);
    /// operator-set labels of the same key win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// SHA-256 (lowercase hex) of the running agent binary; absent when
    /// the agent could not read it, and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_digest: Option<String>,
    /// Whether this agent can replace its own binary (false for the agent
    /// inside `drover serve --local-agent`, and for older agents).
    #[serde(default)]
    pub self_update: bool,
}

impl Hello {
    /// The device's platform: as reported, or for an agent that reports
    /// none, told from its `arch` where that says it all (`x86_64`,
    /// `aarch64`; 32-bit ARM has variants the old report does not give).
    pub fn effective_platform(&self) -> Option<Platform> {
        if let Some(p) = &self.platform {
            return Some(p.clone());
        }
        match self.arch.as_str() {
            "x86_64" | "aarch64" => Platform::from_rust("linux", &self.arch, None),
            _ => None,
        }
    }
}

/// `status`: retained; the agent publishes `online: true` on connect and the
/// broker publishes its Last Will, `online: false`, when the connection is lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub online: bool,
    /// 0 in the Last Will: it is written at connect time, not at loss.
    pub at_ms: u64,
}

/// `heartbeat`: retained, every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    pub at_ms: u64,
    pub seq: u64,
    pub uptime_s: u64,
    pub applied_generation: u64,
    /// How often the agent sends heartbeats: the orchestrator counts a
    /// device offline after a few of them go missing. 0 (older agents):
    /// the orchestrator's default applies.
    #[serde(default)]
    pub interval_ms: u64,
}

/// `state`: retained; what actually runs, after every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    pub at_ms: u64,
    pub observed: ObservedState,
}

/// `telemetry`: host and per-container resource usage.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Telemetry {
    pub at_ms: u64,
    pub host: HostMetrics,
    pub containers: Vec<ContainerMetrics>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostMetrics {
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub load_1: f64,
    pub load_5: f64,
    pub load_15: f64,
    pub uptime_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContainerMetrics {
    pub app: Name,
    pub container: Name,
    /// Percent of one core, as `docker stats` shows it.
    pub cpu_percent: f32,
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
}

/// `logs`: a bounded batch of lines from one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogBatch {
    pub app: Name,
    pub container: Name,
    pub lines: Vec<LogLine>,
    /// Lines the agent had to drop before this batch because its buffer was full.
    #[serde(default)]
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    pub at_ms: u64,
    pub stream: LogStream,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// `desired`: retained; the device's whole desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub state: DesiredState,
}

/// `secrets`: retained; the credentials for exactly the registries this
/// device's desired apps pull from. An empty list clears them. Never in the
/// desired state, never logged: `Debug` leaves the passwords out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Secrets {
    /// When the orchestrator issued this set; a device keeps the newest it
    /// has seen, so a late redelivery of an older set cannot replace it.
    pub issued_at_ms: u64,
    #[serde(default)]
    pub registries: Vec<RegistryCredential>,
}

impl Secrets {
    /// The credentials for one registry host (compared case-insensitively).
    pub fn for_host(&self, host: &str) -> Option<&RegistryCredential> {
        self.registries
            .iter()
            .find(|r| r.host.eq_ignore_ascii_case(host))
    }

    /// The hosts it holds credentials for, for logs.
    pub fn hosts(&self) -> Vec<&str> {
        self.registries.iter().map(|r| r.host.as_str()).collect()
    }
}

/// A username and password for one registry host (`host[:port]`, as in
/// image references).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredential {
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `cmd`: a request with an id. Applying the same command twice, or a
/// command whose generation is older than what the device holds, changes
/// nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub issued_at_ms: u64,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Deploy, start, stop or remove: carried as the resulting desired
    /// state, so the device converges on state, not on a sequence of verbs.
    Apply {
        op: Op,
        app: Name,
        desired: DesiredState,
    },
    /// Re-send hello, state and heartbeat now.
    Resync,
    /// Run an edge job once (a repeat of a known id re-sends its report).
    RunJob(crate::job::JobSpec),
    /// Kill and remove a running job: reported `cancelled`.
    CancelJob { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Deploy,
    Start,
    Stop,
    Remove,
    /// Freeze the app's containers (`docker pause`); they keep their memory.
    Pause,
    /// Thaw a paused app.
    Unpause,
    /// Restart the app's running containers (`docker restart`), keeping
    /// them: carried as [`crate::model::DesiredApp::restarted_at`].
    Restart,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Deploy => "deploy",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Remove => "remove",
            Op::Pause => "pause",
            Op::Unpause => "unpause",
            Op::Restart => "restart",
        }
    }
}

/// `ack`: progress and outcome of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub command_id: String,
    pub at_ms: u64,
    pub phase: AckPhase,
    /// Human-readable detail; on failure, Docker's or the registry's own text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPhase {
    /// The device has the command and will work on it.
    Received,
    /// Work under way; see `progress`.
    Progress,
    Succeeded,
    Failed,
    /// A newer desired state replaced this one before it finished.
    Superseded,
}

impl AckPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            AckPhase::Succeeded | AckPhase::Failed | AckPhase::Superseded
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    /// What is happening: `pulling`, `creating`, `starting`, `stopping`, `removing`.
    pub step: String,
    pub container: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
}

/// `event`: something the agent did or saw on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceEvent {
    pub at_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Name>,
    /// What happened, in words; Docker's text where there is one.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A managed container was found stopped, exited or missing when it
    /// should run, and was started or recreated.
    DriftRepaired,
    /// A managed container exited and its restart policy says to leave it.
    ContainerExited,
    /// A pull failed and will be retried.
    PullRetrying,
    /// An image no managed app uses any more was removed.
    ImageRemoved,
    /// The agent started with no broker and restored its apps from its
    /// local copy of the desired state.
    RestoredFromLocalState,
    /// The local copy of the desired state was not restored: running
    /// containers carry a newer generation, so it is out of date.
    RestoreRefused,
    /// The agent could not write its state directory; it keeps running on
    /// what it holds in memory.
    PersistenceFailed,
    /// The state directory takes writes again.
    PersistenceRecovered,
    /// The Docker daemon stopped answering.
    DockerUnreachable,
    /// The Docker daemon answers again.
    DockerReachable,
    /// The agent runs a new binary and confirmed it (`detail` names it).
    AgentUpdated,
}

macro_rules! message {
    ($($ty:ty => $kind:ident),* $(,)?) => {
        $(impl Message for $ty { const KIND: TopicKind = TopicKind::$kind; })*
    };
}

/// A secret string (token, password). Its `Debug` never shows the value, so
/// a secret inside any payload cannot reach a log through `{:?}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `enroll`: a device without a credential presents an enrollment token,
/// once. It connects as [`crate::identity::ENROLL_USERNAME`] with the token
/// as password, so the broker lets it only publish here and read its own
/// `enrolled` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Correlates the answer with this request.
    pub request_id: String,
    pub token: Secret,
}

/// `enrolled`: the answer to an [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub request_id: String,
    pub outcome: EnrollOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum EnrollOutcome {
    /// The device's MQTT password; its username and client id are its id.
    Accepted { password: Secret },
    /// Why not, for the agent's log; the token is never echoed.
    Refused { reason: String },
}

message! {
    EnrollRequest => Enroll,
    Enrolled => Enrolled,
    Hello => Hello,
    Status => Status,
    Heartbeat => Heartbeat,
    StateReport => State,
    Telemetry => Telemetry,
    LogBatch => Logs,
    Desired => Desired,
    Command => Cmd,
    Ack => Ack,
    DeviceEvent => Event,
    Secrets => Secrets,
    crate::update::FetchRequest => Fetch,
    crate::update::BlobChunk => Blob,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_password() {
        let s = Secrets {
            issued_at_ms: 1,
            registries: vec![RegistryCredential {
                host: "127.0.0.1:5001".into(),
                username: "robot".into(),
                password: "hunter2-very-secret".into(),
            }],
        };
        for text in [format!("{s:?}"), format!("{s:#?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(
                text.contains("robot") && text.contains("<redacted>"),
                "{text}"
            );
        }
        let back: Secrets = crate::decode(&crate::encode(&s)).expect("round trip");
        assert_eq!(back, s);
        assert_eq!(
            back.for_host("127.0.0.1:5001").map(|c| c.password.as_str()),
            Some("hunter2-very-secret")
        );
        assert!(back.for_host("127.0.0.1:5000").is_none());
    }
}
