//! REST endpoints for edge jobs (`contract::jobs`): run a container to
//! completion on the devices a selector matches, follow it, cancel it.
//! Progress also streams on `GET /api/v1/changes?job=ID`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{parse_body, ApiError, ApiResult, ApiState, Ctx};
use crate::contract::{self, ErrorBody};
use crate::core::command::{Command, CommandKind};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(show_job))
        .routes(routes!(cancel_job))
}

/// Runs a container to completion on every device the selector matches
/// now (at most `concurrency` at once; offline devices get it when they
/// come back, until `expires_secs`), collecting each device's exit code
/// and the last 4 KiB of its output.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs",
    request_body = contract::CreateJob,
    responses(
        (status = 201, description = "The job is on its way to its devices", body = contract::Job),
        (status = 400, description = "The body is not valid (shape, selector, image reference, timeout, concurrency, env, command); `field` names what", body = ErrorBody),
        (status = 409, description = "The selector matches no device (`field` is `selector`)", body = ErrorBody),
    ))]
async fn create_job(State(api): State<ApiState>, ctx: Ctx, body: Bytes) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::CreateJob, StatusCode::CREATED, || {
        let req: contract::CreateJob = parse_body(&body)?;
        Ok(Command::CreateJob(Box::new(req)))
    })
    .await
}

/// Jobs, newest first (every running one and the last 100 finished),
/// with their counts but without their devices.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    responses((status = 200, description = "Jobs, newest first", body = Vec<contract::Job>)))]
async fn list_jobs(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListJobs).await?;
    Ok(Json(
        api.commands.engine.jobs().await.map_err(ApiError::from)?,
    ))
}

fn no_job(id: &str) -> ApiError {
    ApiError::field(
        StatusCode::NOT_FOUND,
        "id",
        format!("job {id} does not exist"),
    )
}

/// One job: its phase, counts, and per device its state, exit code,
/// output tail, error and times.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job with every device", body = contract::Job),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
async fn show_job(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowJob).await?;
    match api
        .commands
        .engine
        .job(id.clone())
        .await
        .map_err(ApiError::from)?
    {
        Some(j) => Ok(Json(j)),
        None => Err(no_job(&id)),
    }
}

/// Cancels a job: devices not yet sent it are `cancelled` at once, those
/// running it kill and remove its container and answer `cancelled`.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job after the cancel", body = contract::Job),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has already ended", body = ErrorBody),
    ))]
async fn cancel_job(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::CancelJob, StatusCode::OK, || {
        Ok(Command::CancelJob(id))
    })
    .await
}
