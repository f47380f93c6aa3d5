//! REST endpoints for enrollment, revocation, API tokens, automation
//! identities and the audit log. Secrets appear only in the response that
//! creates them; listings show ids, names and metadata, never a secret or
//! its digest.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_shared::{DeviceId, Name};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{
    device_id, name, parse_body, parse_limit, ApiError, ApiQuery, ApiResult, ApiState, Ctx,
};
use crate::contract::{self, AuditOutcome, ErrorBody, NewApiToken, NewEnrollToken, NewMqttUser};
use crate::core::command::{Command, CommandKind};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_enroll_tokens, create_enroll_token))
        .routes(routes!(delete_enroll_token))
        .routes(routes!(revoke))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(delete_token))
        .routes(routes!(list_automation, create_automation))
        .routes(routes!(delete_automation))
        .routes(routes!(audit))
        .routes(routes!(sign_in, show_session, sign_out))
}

fn session_cookie(api: &ApiState, value: &str, max_age_secs: i64) -> axum::http::HeaderValue {
    let c = cookie::Cookie::build((super::auth::SESSION_COOKIE, value.to_string()))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(api.secure_cookies)
        .max_age(cookie::time::Duration::seconds(max_age_secs))
        .build();
    axum::http::HeaderValue::from_str(&c.to_string())
        .expect("a cookie of token characters is a valid header value")
}

/// The name and role a session shows for an actor.
fn who(actor: &crate::core::command::Actor) -> (String, contract::Role) {
    match actor {
        crate::core::command::Actor::ApiToken { name, role } => (name.clone(), *role),
        other => (other.name(), contract::Role::Viewer),
    }
}

/// Signs in to the console with an API token: sets an `HttpOnly`,
/// `SameSite=Strict` session cookie (`Secure` under HTTPS) that stands for
/// the token's name and role until it expires (12 hours), is signed out, or
/// the token is revoked. Changing requests made with the cookie must send
/// the returned `csrf` value in the `X-Drover-CSRF` header.
#[utoipa::path(post, path = "/api/v1/session", tag = "security",
    request_body = contract::NewSession,
    responses(
        (status = 201, description = "Signed in; the cookie is set", body = contract::Session,
         headers(("Set-Cookie" = String, description = "`drover_session`"))),
        (status = 400, description = "The body is not valid", body = ErrorBody),
        (status = 401, description = "The token is not valid", body = ErrorBody),
        (status = 500, description = "The session could not be stored", body = ErrorBody),
        (status = 503, description = "The orchestrator is stopping", body = ErrorBody),
    ))]
async fn sign_in(State(api): State<ApiState>, body: Bytes) -> ApiResult<Response> {
    let access = &api.commands.access;
    let req: contract::NewSession = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => {
            access
                .audit(
                    &crate::core::command::Actor::Unauthenticated {
                        presented_token: false,
                    },
                    "POST /api/v1/session".into(),
                    None,
                    AuditOutcome::Denied,
                    Some(400),
                    "sign-in body not valid".into(),
                )
                .await;
            return Err(e);
        }
    };
    match access.create_session(req.token.trim()).await {
        Ok(Some((rec, value, actor))) => {
            access
                .audit(
                    &actor,
                    "POST /api/v1/session".into(),
                    None,
                    AuditOutcome::Ok,
                    Some(201),
                    "signed in to the console".into(),
                )
                .await;
            let (name, role) = who(&actor);
            let ttl = (rec.expires_at_ms.saturating_sub(rec.created_at_ms) / 1000) as i64;
            let mut resp = (
                StatusCode::CREATED,
                Json(contract::Session {
                    name,
                    role,
                    csrf: Some(rec.csrf),
                    expires_at_ms: Some(rec.expires_at_ms),
                }),
            )
                .into_response();
            resp.headers_mut().insert(
                axum::http::header::SET_COOKIE,
                session_cookie(&api, &value, ttl),
            );
            resp.extensions_mut().insert(super::Audited);
            Ok(resp)
        }
        Ok(None) => {
            api.commands.metrics.api_denied.inc();
            access
                .audit(
                    &crate::core::command::Actor::Unauthenticated {
                        presented_token: true,
                    },
                    "POST /api/v1/session".into(),
                    None,
                    AuditOutcome::Denied,
                    Some(401),
                    "sign-in with a token that is not valid".into(),
                )
                .await;
            Err(ApiError::field(
                StatusCode::UNAUTHORIZED,
                "token",
                "the API token is not valid (unknown, revoked or malformed)",
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store a session");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the session could not be stored; try again",
            ))
        }
    }
}

/// Who is signed in: the name and role of the token behind the session
/// cookie (or the bearer token), and the session's CSRF value.
#[utoipa::path(get, path = "/api/v1/session", tag = "security",
    responses((status = 200, description = "Who is signed in", body = contract::Session)))]
async fn show_session(
    ctx: Ctx,
    credential: Option<axum::Extension<super::auth::Credential>>,
) -> ApiResult<impl IntoResponse> {
    let (name, role) = who(&ctx.actor);
    let session = match credential.map(|c| c.0) {
        Some(super::auth::Credential::Session(s)) => Some(s),
        _ => None,
    };
    Ok(Json(contract::Session {
        name,
        role,
        csrf: session.as_ref().map(|s| s.csrf.clone()),
        expires_at_ms: session.map(|s| s.expires_at_ms),
    }))
}

/// Signs out: the session ends and its cookie is cleared.
#[utoipa::path(delete, path = "/api/v1/session", tag = "security",
    responses((status = 204, description = "Signed out; the cookie is cleared")))]
async fn sign_out(
    State(api): State<ApiState>,
    _ctx: Ctx,
    credential: Option<axum::Extension<super::auth::Credential>>,
) -> ApiResult<Response> {
    if let Some(super::auth::Credential::Session(s)) = credential.map(|c| c.0) {
        api.commands
            .access
            .delete_session(&s.id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot delete a session");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the session could not be ended; try again",
                )
            })?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(axum::http::header::SET_COOKIE, session_cookie(&api, "", 0));
    Ok(resp)
}

/// Creates an enrollment token, shown only in this response.
#[utoipa::path(post, path = "/api/v1/enrollment-tokens", tag = "security",
    request_body(content = Option<NewEnrollToken>, description = "Every field has a default; no body at all is the defaults"),
    responses(
        (status = 201, description = "The token, with its secret", body = contract::EnrollToken),
        (status = 400, description = "The body is not valid", body = ErrorBody),
    ))]
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

/// Enrollment tokens that can still be used (never their secrets).
#[utoipa::path(get, path = "/api/v1/enrollment-tokens", tag = "security",
    responses((status = 200, description = "Enrollment tokens", body = Vec<contract::EnrollToken>)))]
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

/// Withdraws an enrollment token.
#[utoipa::path(delete, path = "/api/v1/enrollment-tokens/{id}", tag = "security",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 204, description = "Withdrawn"),
        (status = 404, description = "No such token", body = ErrorBody),
    ))]
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

/// Revokes a device's broker credential: disconnected now, refused from then on.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "security",
    params(("id" = DeviceId, Path, description = "The device id")),
    responses(
        (status = 200, description = "Revoked", body = contract::RevokeResponse),
        (status = 400, description = "The device id is not valid", body = ErrorBody),
        (status = 404, description = "The device has no credential", body = ErrorBody),
    ))]
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

/// Creates an API token, shown only in this response.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "security",
    request_body = NewApiToken,
    responses(
        (status = 201, description = "The token, with its secret", body = contract::ApiToken),
        (status = 400, description = "The body is not valid", body = ErrorBody),
        (status = 409, description = "A token of that name exists", body = ErrorBody),
    ))]
async fn create_token(State(api): State<ApiState>, ctx: Ctx, body: Bytes) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::CreateApiToken,
        StatusCode::CREATED,
        || Ok(Command::CreateApiToken(parse_body::<NewApiToken>(&body)?)),
    )
    .await
}

/// API tokens (never their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "security",
    responses((status = 200, description = "API tokens", body = Vec<contract::ApiToken>)))]
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

/// Deletes an API token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "security",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such token", body = ErrorBody),
        (status = 409, description = "It is the last admin token", body = ErrorBody),
    ))]
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

/// Creates a broker identity for automation; its password is shown only in this response.
#[utoipa::path(post, path = "/api/v1/mqtt-users", tag = "security",
    request_body = NewMqttUser,
    responses(
        (status = 201, description = "The identity, with its password", body = contract::MqttUser),
        (status = 400, description = "The body is not valid", body = ErrorBody),
        (status = 409, description = "An identity of that name exists", body = ErrorBody),
    ))]
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

/// Broker identities for automation (never their passwords).
#[utoipa::path(get, path = "/api/v1/mqtt-users", tag = "security",
    responses((status = 200, description = "Automation identities", body = Vec<contract::MqttUser>)))]
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

/// Deletes a broker identity for automation.
#[utoipa::path(delete, path = "/api/v1/mqtt-users/{name}", tag = "security",
    params(("name" = Name, Path, description = "The identity's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The name is not valid", body = ErrorBody),
        (status = 404, description = "No such identity", body = ErrorBody),
    ))]
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

/// The audit log, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "security",
    params(
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (default 100)"),
        ("actor" = Option<String>, Query, description = "Only this actor's entries"),
        ("outcome" = Option<AuditOutcome>, Query, description = "Only entries with this outcome"),
    ),
    responses(
        (status = 200, description = "Audit entries", body = Vec<contract::AuditEntry>),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
    ))]
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
