use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What an API token may do: viewers read; operators also deploy, start,
/// stop, remove and enroll; admins do everything.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An enrollment token. `token` is only in the response that created it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollToken {
    pub id: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: u64,
    pub uses_left: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The body of `POST /api/v1/enrollment-tokens` (every field optional).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollToken {
    #[serde(default = "NewEnrollToken::default_ttl")]
    pub ttl_secs: u64,
    #[serde(default = "NewEnrollToken::one")]
    pub uses: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
}

impl NewEnrollToken {
    fn default_ttl() -> u64 {
        3600
    }
    fn one() -> u32 {
        1
    }
}

impl Default for NewEnrollToken {
    fn default() -> Self {
        NewEnrollToken {
            ttl_secs: Self::default_ttl(),
            uses: Self::one(),
            device_id: None,
        }
    }
}

/// A REST API token. `token` is only in the response that created it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub id: String,
    pub name: Name,
    pub role: Role,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiToken {
    pub name: Name,
    pub role: Role,
}

/// The body of `POST /api/v1/session`: sign in to the console with an
/// API token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    pub token: String,
}

/// Who is signed in (`POST`/`GET /api/v1/session`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// The API token's name.
    pub name: String,
    pub role: Role,
    /// With a session cookie: the value every changing request must send
    /// in the `X-Drover-CSRF` header. Absent for a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// A broker identity for automation. `password` is only in the response
/// that created it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MqttUser {
    pub name: Name,
    /// The MQTT username to connect with (any client id).
    pub username: String,
    /// What its JSON requests over MQTT may do (viewer or operator).
    pub role: Role,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// The body of `POST /api/v1/mqtt-users`. Without `subscribe`, the identity
/// reads the JSON tree and what devices report; without `role`, it is a
/// viewer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMqttUser {
    pub name: Name,
    /// `viewer` (default) or `operator`; never `admin`: an MQTT login
    /// does not manage who may do what.
    #[serde(default = "viewer")]
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    #[serde(default)]
    pub publish: Vec<String>,
}

fn viewer() -> Role {
    Role::Viewer
}

/// How an audited command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    Ok,
    /// Refused: no valid credential, or a role too weak.
    Denied,
    Failed,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Denied => "denied",
            AuditOutcome::Failed => "failed",
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    /// Who: the API token's name, `device:<id>` for MQTT enrollment,
    /// `anonymous` or `invalid-token` without a valid credential.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// What, e.g. `POST /api/v1/devices/pi-1/apps` or `mqtt enroll`.
    pub action: String,
    /// The command, e.g. `deploy`, `app.create`, when the request became one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub outcome: AuditOutcome,
    /// HTTP status for API calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}
