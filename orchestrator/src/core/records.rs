//! What the orchestrator stores in redb, and how each record is shown by
//! the API (the `From` impls into `contract` types). Records keep their
//! serialized shape across releases; the API's views may change on their
//! own.

use std::collections::{BTreeMap, BTreeSet};

use drover_shared::identity::automation_username;
use drover_shared::model::{AppSpec, DesiredState, ObservedState, RunState};
use drover_shared::payload::{Hello, Op, Progress, RegistryCredential};
use drover_shared::{DeviceId, Name, Platform};
use serde::{Deserialize, Serialize};

use crate::contract::{self, AuditOutcome, OpStatus, Role};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub online: bool,
    #[serde(default)]
    pub inventory: Option<Hello>,
    #[serde(default)]
    pub observed: Option<ObservedState>,
    /// Operator-set labels. The device's own (`Hello::labels`) are in
    /// `inventory`; see [`crate::core::selector::effective_labels`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    pub spec: AppSpec,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Every kept release of the spec, oldest first; the last is `spec`.
    /// Empty only in records from before releases existed (see
    /// [`AppRecord::with_first_release`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<ReleaseRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<AssignmentRecord>,
}

/// One immutable, numbered version of an app's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub number: u64,
    pub created_at_ms: u64,
    /// Who made it (the actor's name).
    pub author: String,
    pub spec: AppSpec,
}

impl AppRecord {
    /// The newest release's number (0: none).
    pub fn latest_release(&self) -> u64 {
        self.releases.last().map_or(0, |r| r.number)
    }

    pub fn release(&self, number: u64) -> Option<&ReleaseRecord> {
        self.releases.iter().find(|r| r.number == number)
    }

    /// A record stored before releases existed gets its spec as release 1.
    pub fn with_first_release(mut self) -> AppRecord {
        if self.releases.is_empty() {
            self.releases.push(ReleaseRecord {
                number: 1,
                created_at_ms: self.updated_at_ms,
                author: String::new(),
                spec: self.spec.clone(),
            });
        }
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DesiredRecord {
    pub device: DeviceId,
    pub state: DesiredState,
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
}

/// Why apps are in a device's desired state: which a fleet assignment put
/// there (and may take away), and which an operator deployed or removed by
/// hand on this device, overriding the app's assignment until cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub assigned: BTreeSet<Name>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub overrides: BTreeSet<Name>,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty() && self.overrides.is_empty()
    }
}

/// "App A at release R, running or stopped, on every device matching
/// selector S": kept true by the engine as devices come and change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// Canonical form of a valid selector (`core::selector`).
    pub selector: String,
    pub release: u64,
    pub run: RunState,
    pub updated_at_ms: u64,
    pub author: String,
    /// The platforms each image of the release provided when the
    /// assignment was made (read from its registry by the command path;
    /// images it could not read are absent). A device that joins later is
    /// placed only where these allow (`ImagePlatforms::all_run_on`): the
    /// engine never asks a registry itself. Absent from older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<ImagePlatforms>,
}

/// The platforms one image provides, as its registry said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePlatforms {
    pub image: String,
    pub platforms: Vec<Platform>,
}

impl ImagePlatforms {
    /// Whether a device of platform `device` can run every image of an
    /// assignment whose images provide `known` (containerd's matching,
    /// `Platform::runs`). A device that reports no platform, and an image
    /// whose platforms were not read, are not held against each other:
    /// only the device can tell then.
    pub fn all_run_on(known: &[ImagePlatforms], device: Option<&Platform>) -> bool {
        let Some(device) = device else {
            return true;
        };
        known
            .iter()
            .all(|i| i.platforms.iter().any(|p| device.runs(p)))
    }
}

/// A request to change one device, followed from issue to final outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationRecord {
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

/// A device's broker credential. Only the digest of the password is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub device: DeviceId,
    pub password_digest: String,
    pub issued_at_ms: u64,
    /// How it was issued: the enrollment token's id, or "local-agent".
    pub issued_via: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// An enrollment token. The token itself is shown once, at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub secret_digest: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: u64,
    /// Enrollments this token may still make.
    pub uses_left: u32,
    /// When set, only this device id may enroll with it, and it may
    /// replace that device's existing credential (re-enrollment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
}

/// An automation identity for the broker, with explicit permissions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutomationRecord {
    pub name: Name,
    pub password_digest: String,
    /// Records from before roles existed are viewers.
    #[serde(default = "viewer")]
    pub role: Role,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    pub created_at_ms: u64,
    pub created_by: String,
}

fn viewer() -> Role {
    Role::Viewer
}

/// A REST API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: Name,
    pub role: Role,
    pub secret_digest: String,
    pub created_at_ms: u64,
    pub created_by: String,
}

/// A console sign-in: a cookie that stands for an API token (its role,
/// as long as the token exists) until it expires or signs out. Only the
/// secret's digest is stored; the CSRF value is not a credential on its
/// own (it is useless without the cookie) and is kept as it is, to show
/// the signed-in page again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub secret_digest: String,
    pub token_id: String,
    pub csrf: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: u64,
    /// The API token's name, `device:<id>` for MQTT enrollment, or
    /// `anonymous` when no valid credential was presented.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// e.g. `POST /api/v1/devices/pi-1/apps` or `mqtt enroll`.
    pub action: String,
    /// The command the request became, e.g. `deploy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub outcome: AuditOutcome,
    /// HTTP status for API calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Stored credentials for one registry host. `Debug` (through
/// [`RegistryCredential`]) leaves the password out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryRecord {
    #[serde(flatten)]
    pub credential: RegistryCredential,
    pub updated_at_ms: u64,
}

// ----- the API's views of the records ------------------------------------------

impl From<&AppRecord> for contract::App {
    fn from(r: &AppRecord) -> Self {
        contract::App {
            privileges: r.spec.privileges(),
            spec: r.spec.clone(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            latest_release: r.latest_release(),
            assignment_selector: r.assignment.as_ref().map(|a| a.selector.clone()),
        }
    }
}

impl From<&ReleaseRecord> for contract::Release {
    fn from(r: &ReleaseRecord) -> Self {
        contract::Release {
            number: r.number,
            created_at_ms: r.created_at_ms,
            author: r.author.clone(),
            spec: r.spec.clone(),
        }
    }
}

impl From<&OperationRecord> for contract::Operation {
    fn from(r: &OperationRecord) -> Self {
        contract::Operation {
            id: r.id.clone(),
            device: r.device.clone(),
            app: r.app.clone(),
            op: r.op,
            generation: r.generation,
            status: r.status,
            detail: r.detail.clone(),
            progress: r.progress.clone(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }
}

impl From<&RegistryRecord> for contract::Registry {
    fn from(r: &RegistryRecord) -> Self {
        contract::Registry {
            host: r.credential.host.clone(),
            username: r.credential.username.clone(),
            password_set: !r.credential.password.is_empty(),
            updated_at_ms: r.updated_at_ms,
        }
    }
}

impl From<&EnrollTokenRecord> for contract::EnrollToken {
    fn from(r: &EnrollTokenRecord) -> Self {
        contract::EnrollToken {
            id: r.id.clone(),
            created_at_ms: r.created_at_ms,
            created_by: r.created_by.clone(),
            expires_at_ms: r.expires_at_ms,
            uses_left: r.uses_left,
            device: r.device.clone(),
            token: None,
        }
    }
}

impl From<&ApiTokenRecord> for contract::ApiToken {
    fn from(r: &ApiTokenRecord) -> Self {
        contract::ApiToken {
            id: r.id.clone(),
            name: r.name.clone(),
            role: r.role,
            created_at_ms: r.created_at_ms,
            created_by: r.created_by.clone(),
            token: None,
        }
    }
}

impl From<&AutomationRecord> for contract::MqttUser {
    fn from(r: &AutomationRecord) -> Self {
        contract::MqttUser {
            username: automation_username(r.name.as_str()),
            name: r.name.clone(),
            role: r.role,
            subscribe: r.subscribe.clone(),
            publish: r.publish.clone(),
            created_at_ms: r.created_at_ms,
            created_by: r.created_by.clone(),
            password: None,
        }
    }
}

impl From<&AuditRecord> for contract::AuditEntry {
    fn from(r: &AuditRecord) -> Self {
        contract::AuditEntry {
            seq: r.seq,
            at_ms: r.at_ms,
            actor: r.actor.clone(),
            role: r.role,
            action: r.action.clone(),
            command: r.command.clone(),
            outcome: r.outcome,
            status: r.status,
            detail: r.detail.clone(),
        }
    }
}

/// A write the core asks for; the store applies a batch of them in one
/// transaction.
#[derive(Debug, Clone)]
// Writes live only from a change to its commit; boxing the device record
// would cost an allocation on every device message to save a few bytes.
#[allow(clippy::large_enum_variant)]
pub enum Write {
    Device(DeviceRecord),
    App(AppRecord),
    DeleteApp(String),
    Desired(DesiredRecord),
    Operation(OperationRecord),
    Credential(CredentialRecord),
    EnrollToken(EnrollTokenRecord),
    DeleteEnrollToken(String),
    Automation(AutomationRecord),
    DeleteAutomation(String),
    ApiToken(ApiTokenRecord),
    DeleteApiToken(String),
    /// Appends an audit record and drops the ones at or below `prune_to`.
    Audit {
        record: AuditRecord,
        prune_to: Option<u64>,
    },
    Registry(RegistryRecord),
    DeleteRegistry(String),
    Rollout(Box<RolloutRecord>),
    DeleteRollout(String),
    Job(Box<crate::core::jobs::Job>),
    DeleteJob(String),
    Session(SessionRecord),
    DeleteSession(String),
    Rule(Box<crate::contract::Rule>),
    DeleteRule(String),
    /// Appends a rule firing and drops the ones at or below `prune_to`.
    RuleFiring {
        firing: Box<crate::contract::RuleFiring>,
        prune_to: Option<u64>,
    },
    AgentRelease(AgentReleaseRecord),
    /// By digest.
    DeleteAgentRelease(String),
}

/// An uploaded agent binary; the file is `<data-dir>/agent-binaries/<digest>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReleaseRecord {
    pub version: String,
    pub release: u64,
    pub arch: String,
    pub digest: String,
    pub size: u64,
    pub uploaded_by: String,
    pub created_ms: u64,
}

impl From<&AgentReleaseRecord> for contract::AgentRelease {
    fn from(r: &AgentReleaseRecord) -> Self {
        contract::AgentRelease {
            version: r.version.clone(),
            release: r.release,
            arch: r.arch.clone(),
            digest: r.digest.clone(),
            size: r.size,
            uploaded_by: r.uploaded_by.clone(),
            created_ms: r.created_ms,
        }
    }
}

/// A rollout as stored: the state machine and what its end needs. The
/// app's assignment is moved to the rollout's target when it starts;
/// `previous_assignment` is what a rollback or an abort puts back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub rollout: crate::core::rollout::Rollout,
    pub previous_assignment: Option<AssignmentRecord>,
    /// Running or stopped, as the devices get the release.
    pub run: RunState,
    /// An agent rollout's binaries: agent release → architecture → binary,
    /// for the target and every release its devices ran before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_binaries: BTreeMap<u64, BTreeMap<String, drover_shared::update::AgentTarget>>,
}
