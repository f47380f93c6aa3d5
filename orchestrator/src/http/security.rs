//! REST endpoints for enrollment, revocation, API tokens, automation
//! identities and the audit log. Secrets appear only in the response that
//! creates them; listings show ids, names and metadata, never a secret or
//! its digest.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use drover_shared::identity::automation_username;
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};

use crate::core::records::{ApiTokenRecord, AutomationRecord, EnrollTokenRecord};
use crate::engine::Service;
use crate::http::{
    audited, device_id, name, parse_body, parse_limit, ApiError, ApiQuery, ApiResult,
};
use crate::security::access::{AccessError, Caller, Role};
use crate::security::identity::IdentityError;

pub fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route(
            "/api/v1/enrollment-tokens",
            get(list_enroll_tokens).post(create_enroll_token),
        )
        .route(
            "/api/v1/enrollment-tokens/{id}",
            delete(delete_enroll_token),
        )
        .route("/api/v1/devices/{id}/revoke", post(revoke))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", delete(delete_token))
        .route(
            "/api/v1/mqtt-users",
            get(list_automation).post(create_automation),
        )
        .route("/api/v1/mqtt-users/{name}", delete(delete_automation))
        .route("/api/v1/audit", get(audit))
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Invalid(m) => {
                let field = m.split(':').next().unwrap_or_default().to_string();
                ApiError::field(StatusCode::BAD_REQUEST, field, m)
            }
            e @ IdentityError::Exists(_) => {
                ApiError::field(StatusCode::CONFLICT, "name", e.to_string())
            }
            IdentityError::Store(s) => ApiError::store(s),
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Invalid(m) => ApiError::new(StatusCode::CONFLICT, m),
            e @ AccessError::NameTaken(_) => {
                ApiError::field(StatusCode::CONFLICT, "name", e.to_string())
            }
            e @ AccessError::NameReserved(_) => {
                ApiError::field(StatusCode::BAD_REQUEST, "name", e.to_string())
            }
            AccessError::Store(s) => ApiError::store(s),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollTokenView {
    pub id: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: u64,
    pub uses_left: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// Only in the response that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<EnrollTokenRecord> for EnrollTokenView {
    fn from(r: EnrollTokenRecord) -> Self {
        EnrollTokenView {
            id: r.id,
            created_at_ms: r.created_at_ms,
            created_by: r.created_by,
            expires_at_ms: r.expires_at_ms,
            uses_left: r.uses_left,
            device: r.device,
            token: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollToken {
    #[serde(default = "default_ttl")]
    ttl_secs: u64,
    #[serde(default = "one")]
    uses: u32,
    #[serde(default)]
    device_id: Option<DeviceId>,
}

fn default_ttl() -> u64 {
    3600
}

fn one() -> u32 {
    1
}

async fn create_enroll_token(
    State(s): State<Arc<Service>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: NewEnrollToken = if body.is_empty() {
        NewEnrollToken {
            ttl_secs: default_ttl(),
            uses: one(),
            device_id: None,
        }
    } else {
        parse_body(&body)?
    };
    let (rec, token) = s
        .identities
        .create_enroll_token(&caller.name, req.ttl_secs, req.uses, req.device_id)
        .await?;
    let detail = format!(
        "enrollment token {}, {} use(s), expires at {} ms{}",
        rec.id,
        rec.uses_left,
        rec.expires_at_ms,
        rec.device
            .as_ref()
            .map(|d| format!(", only for device {d}"))
            .unwrap_or_default()
    );
    let mut view = EnrollTokenView::from(rec);
    view.token = Some(token);
    Ok((StatusCode::CREATED, audited(detail), Json(view)))
}

async fn list_enroll_tokens(State(s): State<Arc<Service>>) -> impl IntoResponse {
    Json(
        s.identities
            .enroll_tokens()
            .into_iter()
            .map(EnrollTokenView::from)
            .collect::<Vec<_>>(),
    )
}

async fn delete_enroll_token(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if s.identities.delete_enroll_token(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "id",
            format!("enrollment token {id:?} does not exist"),
        ))
    }
}

async fn revoke(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    if !s.identities.revoke(&id).await? {
        return Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "device",
            format!("device {id} has no credential to revoke"),
        ));
    }
    Ok(Json(serde_json::json!({
        "device": id,
        "credential": s.identities.credential_state(&id),
    })))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ApiTokenView {
    pub id: String,
    pub name: Name,
    pub role: Role,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<ApiTokenRecord> for ApiTokenView {
    fn from(r: ApiTokenRecord) -> Self {
        ApiTokenView {
            id: r.id,
            name: r.name,
            role: r.role,
            created_at_ms: r.created_at_ms,
            created_by: r.created_by,
            token: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: Name,
    role: Role,
}

async fn create_token(
    State(s): State<Arc<Service>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: NewToken = parse_body(&body)?;
    let (rec, token) = s
        .access
        .create_token(&caller.name, req.name, req.role)
        .await?;
    let detail = format!(
        "API token {} named {} with role {}",
        rec.id, rec.name, rec.role
    );
    let mut view = ApiTokenView::from(rec);
    view.token = Some(token);
    Ok((StatusCode::CREATED, audited(detail), Json(view)))
}

async fn list_tokens(State(s): State<Arc<Service>>) -> impl IntoResponse {
    Json(
        s.access
            .tokens()
            .into_iter()
            .map(ApiTokenView::from)
            .collect::<Vec<_>>(),
    )
}

async fn delete_token(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if s.access.delete_token(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "id",
            format!("API token {id:?} does not exist"),
        ))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AutomationView {
    pub name: Name,
    /// The MQTT username to connect with (any client id).
    pub username: String,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl From<AutomationRecord> for AutomationView {
    fn from(r: AutomationRecord) -> Self {
        AutomationView {
            username: automation_username(r.name.as_str()),
            name: r.name,
            subscribe: r.subscribe,
            publish: r.publish,
            created_at_ms: r.created_at_ms,
            created_by: r.created_by,
            password: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAutomation {
    name: Name,
    #[serde(default)]
    subscribe: Option<Vec<String>>,
    #[serde(default)]
    publish: Vec<String>,
}

async fn create_automation(
    State(s): State<Arc<Service>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: NewAutomation = parse_body(&body)?;
    let (rec, password) = s
        .identities
        .create_automation(&caller.name, req.name, req.subscribe, req.publish)
        .await?;
    let detail = format!("subscribe {:?}, publish {:?}", rec.subscribe, rec.publish);
    let mut view = AutomationView::from(rec);
    view.password = Some(password);
    Ok((StatusCode::CREATED, audited(detail), Json(view)))
}

async fn list_automation(State(s): State<Arc<Service>>) -> impl IntoResponse {
    Json(
        s.identities
            .automation()
            .into_iter()
            .map(AutomationView::from)
            .collect::<Vec<_>>(),
    )
}

async fn delete_automation(
    State(s): State<Arc<Service>>,
    Path(n): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let n = name("name", &n)?;
    if s.identities.delete_automation(n.as_str()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "name",
            format!("automation identity {n} does not exist"),
        ))
    }
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<String>,
    actor: Option<String>,
    outcome: Option<String>,
}

async fn audit(
    State(s): State<Arc<Service>>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    let limit = parse_limit(q.limit.as_deref())?;
    if let Some(o) = q.outcome.as_deref() {
        if !matches!(o, "ok" | "denied" | "failed") {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "outcome",
                format!("`outcome` must be ok, denied or failed, got {o:?}"),
            ));
        }
    }
    let log = s
        .access
        .audit_log(limit, q.actor, q.outcome)
        .await
        .map_err(ApiError::store)?;
    Ok(Json(log))
}
