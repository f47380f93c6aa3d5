//! REST endpoints for agent releases: agent binaries uploaded under a
//! version, which rollouts put on devices and devices fetch over MQTT.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiQuery, ApiResult, ApiState, Ctx};
use crate::contract::{self, ErrorBody};
use crate::core::agent_releases::MAX_BINARY_BYTES;
use crate::core::command::{Command, CommandKind};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_agent_releases, upload_agent_release))
        .routes(routes!(delete_agent_release))
}

/// Every uploaded agent binary, by version and architecture.
#[utoipa::path(get, path = "/api/v1/agent-releases", tag = "agent-releases",
    responses((status = 200, description = "Agent releases, oldest first", body = Vec<contract::AgentRelease>)))]
async fn list_agent_releases(
    State(api): State<ApiState>,
    ctx: Ctx,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListAgentReleases).await?;
    let all: Vec<contract::AgentRelease> = api
        .commands
        .agent_releases
        .list()
        .iter()
        .map(Into::into)
        .collect();
    Ok(Json(all))
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    version: Option<String>,
}

/// Uploads an agent binary (a Linux ELF executable for x86_64, aarch64 or
/// arm, at most 64 MiB) under a version; its architecture is read from
/// the ELF header, its SHA-256 is its digest. One binary per version and
/// architecture.
#[utoipa::path(post, path = "/api/v1/agent-releases", tag = "agent-releases",
    params(("version" = String, Query, description = "The agent version: 1 to 64 of `[A-Za-z0-9._+-]`")),
    request_body(description = "The agent binary", content((Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 201, description = "Stored", body = contract::AgentRelease),
        (status = 400, description = "No or an invalid version, an empty body, or not an ELF executable Drover's agent is built for; `field` names what", body = ErrorBody),
        (status = 409, description = "The binary is uploaded already, or the version has a binary for that architecture", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 MiB", body = ErrorBody),
    ))]
async fn upload_agent_release(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    // Nothing is read for a caller who may not upload.
    ctx.authorize(&api, CommandKind::UploadAgentRelease).await?;
    let binary = super::read_body(&headers, body, MAX_BINARY_BYTES, "the binary").await?;
    ctx.run(
        &api,
        CommandKind::UploadAgentRelease,
        StatusCode::CREATED,
        || {
            let version = q.version.ok_or_else(|| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    "version",
                    "the query parameter `version` is required",
                )
            })?;
            Ok(Command::UploadAgentRelease { version, binary })
        },
    )
    .await
}

/// Deletes an agent release and its binary; refused while a device's
/// desired state or a running rollout names it.
#[utoipa::path(delete, path = "/api/v1/agent-releases/{digest}", tag = "agent-releases",
    params(("digest" = String, Path, pattern = r"^[0-9a-f]{64}$", description = "The binary's SHA-256")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a digest", body = ErrorBody),
        (status = 404, description = "No agent release has that digest", body = ErrorBody),
        (status = 409, description = "Devices or a rollout still use it (the message names them)", body = ErrorBody),
    ))]
async fn delete_agent_release(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::DeleteAgentRelease,
        StatusCode::NO_CONTENT,
        || Ok(Command::DeleteAgentRelease(digest)),
    )
    .await
}
