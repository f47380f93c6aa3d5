//! The REST API's contract: every request and response body, shared by the
//! server (`http`), the CLI, the tests and the load test.
//!
//! These types are what the API promises, not what redb stores: the stored
//! records live in `core::records` and are turned into these views at the
//! edge, so either can change without silently changing the other. This
//! module imports only `drover-shared` (the protocol's model types, which
//! the API shows as they are), serde, and utoipa's `ToSchema` derive: these
//! types are the schemas of the OpenAPI document (`http::openapi`).

mod agent_releases;
mod apps;
mod changes;
mod devices;
mod errors;
mod history;
mod jobs;
mod operations;
mod registries;
mod rollouts;
mod rules;
mod security;

pub use agent_releases::AgentRelease;
pub use apps::{App, Assignment, AssignmentRequest, DeployRequest, Release};
pub use changes::{Change, ChangeFilter, Coalescer};
pub use devices::{CredentialState, Device, LabelsPatch, LabelsPut, RevokeResponse};
pub use errors::{ErrorBody, ErrorDetail};
pub use history::{ContainerPoint, HostPoint, Resolution, Stat, TelemetryPoint, TelemetrySeries};
pub use jobs::{CreateJob, Job, JobCounts, JobDevice, JobDeviceState, JobPhase};
pub use operations::{OpStatus, Operation};
pub use registries::{Registry, RegistryCredentials};
pub use rollouts::{
    BatchSize, CreateRollout, OnFailure, Rollout, RolloutAction, RolloutCounts, RolloutDevice,
    RolloutDeviceState, RolloutPhase,
};
pub use rules::{ActionOutcome, FiringOutcome, Rule, RuleAction, RuleFiring, Trigger};
pub use security::{
    ApiToken, AuditEntry, AuditOutcome, EnrollToken, MqttUser, NewApiToken, NewEnrollToken,
    NewMqttUser, NewSession, Role, Session,
};

/// The prefix of every API route.
pub const API_PREFIX: &str = "/api/v1";
