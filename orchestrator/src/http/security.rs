//! REST endpoints for enrollment, revocation, API tokens, automation
//! identities and the audit log. Secrets appear only in the response that
//! creates them; listings show ids, names and metadata, never a secret or
//! its digest.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{
    device_id, name, parse_body, parse_limit, ApiError, ApiQuery, ApiResult, ApiState, Ctx,
};
use crate::contract::{self, AuditOutcome, NewApiToken, NewEnrollToken, NewMqttUser};
use crate::core::command::{Command, CommandKind};

pub fn routes() -> Router<ApiState> {
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

async fn create_enroll_token(
    State(api): State<ApiState>,
    ctx: Ctx,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::CreateEnrollToken,
        StatusCode::CREATED,
        || {
            // Every field has a default, so no body at all is fine.
            let req = if body.is_empty() {
                NewEnrollToken::default()
            } else {
                parse_body(&body)?
            };
            Ok(Command::CreateEnrollToken(req))
        },
    )
    .await
}

async fn list_enroll_tokens(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListEnrollTokens).await?;
    Ok(Json(
        api.commands
            .identities
            .enroll_tokens()
            .iter()
            .map(contract::EnrollToken::from)
            .collect::<Vec<_>>(),
    ))
}

async fn delete_enroll_token(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::DeleteEnrollToken,
        StatusCode::NO_CONTENT,
        || Ok(Command::DeleteEnrollToken(id)),
    )
    .await
}

async fn revoke(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::RevokeDevice, StatusCode::OK, || {
        Ok(Command::RevokeDevice(device_id(&id)?))
    })
    .await
}

async fn create_token(State(api): State<ApiState>, ctx: Ctx, body: Bytes) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::CreateApiToken,
        StatusCode::CREATED,
        || Ok(Command::CreateApiToken(parse_body::<NewApiToken>(&body)?)),
    )
    .await
}

async fn list_tokens(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListApiTokens).await?;
    Ok(Json(
        api.commands
            .access
            .tokens()
            .iter()
            .map(contract::ApiToken::from)
            .collect::<Vec<_>>(),
    ))
}

async fn delete_token(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::DeleteApiToken,
        StatusCode::NO_CONTENT,
        || Ok(Command::DeleteApiToken(id)),
    )
    .await
}

async fn create_automation(
    State(api): State<ApiState>,
    ctx: Ctx,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::CreateMqttUser,
        StatusCode::CREATED,
        || Ok(Command::CreateMqttUser(parse_body::<NewMqttUser>(&body)?)),
    )
    .await
}

async fn list_automation(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListMqttUsers).await?;
    Ok(Json(
        api.commands
            .identities
            .automation()
            .iter()
            .map(contract::MqttUser::from)
            .collect::<Vec<_>>(),
    ))
}

async fn delete_automation(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::DeleteMqttUser,
        StatusCode::NO_CONTENT,
        || Ok(Command::DeleteMqttUser(name("name", &n)?)),
    )
    .await
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<String>,
    actor: Option<String>,
    outcome: Option<String>,
}

async fn audit(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ReadAudit).await?;
    let limit = parse_limit(q.limit.as_deref())?;
    let outcome = match q.outcome.as_deref() {
        None => None,
        Some("ok") => Some(AuditOutcome::Ok),
        Some("denied") => Some(AuditOutcome::Denied),
        Some("failed") => Some(AuditOutcome::Failed),
        Some(o) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "outcome",
                format!("`outcome` must be ok, denied or failed, got {o:?}"),
            ))
        }
    };
    let log = api
        .commands
        .access
        .audit_log(limit, q.actor, outcome)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "reading the audit log failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the audit log could not be read",
            )
        })?;
    Ok(Json(
        log.iter()
            .map(contract::AuditEntry::from)
            .collect::<Vec<_>>(),
    ))
}
