//! REST endpoints for rollouts (`contract::rollouts`): create one with a
//! strategy, follow it, act on it. Progress also streams on
//! `GET /api/v1/changes?rollout=ID`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_shared::Name;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{name, parse_body, parse_limit, ApiError, ApiQuery, ApiResult, ApiState, Ctx};
use crate::contract::{self, ErrorBody, RolloutAction, RolloutDeviceState};
use crate::core::command::{Command, CommandKind};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_rollouts, create_rollout))
        .routes(routes!(show_rollout))
        .routes(routes!(rollout_devices))
        .routes(routes!(rollout_action))
}

/// Rolls a release of an app out to the devices a label selector matches,
/// batch by batch: the first batch is the canary; each batch must reach
/// its success threshold before the next starts; when it cannot, the
/// rollout rolls back (or pauses, or goes on, as `on_failure` says). A
/// device counts as updated once every container of the app runs, healthy
/// where it has a health check, for `min_ready_secs`. The app's assignment
/// moves to the rollout's selector and release; a running rollout of the
/// same app is superseded. An empty selector means the app's assignment's
/// selector, or every device when it has none.
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts",
    request_body = contract::CreateRollout,
    responses(
        (status = 201, description = "The rollout has started (its first batch is on its way)", body = contract::Rollout),
        (status = 400, description = "The body is not valid; `field` names what", body = ErrorBody),
        (status = 404, description = "No such app or release", body = ErrorBody),
        (status = 409, description = "The selector matches no device the app's assignment may manage, or an image does not provide the platform of a device it matches (`field` is `image`; the message names the devices)", body = ErrorBody),
    ))]
async fn create_rollout(State(api): State<ApiState>, ctx: Ctx, body: Bytes) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::CreateRollout,
        StatusCode::CREATED,
        || {
            let req: contract::CreateRollout = parse_body(&body)?;
            Ok(Command::CreateRollout(Box::new(req)))
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    /// Only this app's rollouts.
    app: Option<String>,
}

/// Rollouts, newest first: every running one and the last 100 finished.
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts",
    params(("app" = Option<Name>, Query, description = "Only this app's rollouts")),
    responses(
        (status = 200, description = "Rollouts, newest first", body = Vec<contract::Rollout>),
        (status = 400, description = "The app name is not valid", body = ErrorBody),
    ))]
async fn list_rollouts(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListRollouts).await?;
    let app = q.app.as_deref().map(|a| name("app", a)).transpose()?;
    Ok(Json(
        api.commands
            .engine
            .rollouts(app)
            .await
            .map_err(ApiError::from)?,
    ))
}

/// Any text is looked up: one that names no rollout is a 404, like an id
/// of the right shape that names none.
fn rollout_id(raw: &str) -> ApiResult<String> {
    Ok(raw.to_string())
}

fn no_rollout(id: &str) -> ApiError {
    ApiError::field(
        StatusCode::NOT_FOUND,
        "id",
        format!("rollout {id} does not exist"),
    )
}

/// One rollout: phase, per-batch counts, and why it stopped if it did.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = String, Path, description = "The rollout id")),
    responses(
        (status = 200, description = "The rollout", body = contract::Rollout),
        (status = 404, description = "No such rollout", body = ErrorBody),
    ))]
async fn show_rollout(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(raw): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowRollout).await?;
    let id = rollout_id(&raw)?;
    match api
        .commands
        .engine
        .rollout(id.clone())
        .await
        .map_err(ApiError::from)?
    {
        Some(r) => Ok(Json(r)),
        None => Err(no_rollout(&id)),
    }
}

#[derive(Debug, Deserialize)]
struct DevicesQuery {
    state: Option<String>,
    batch: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// A rollout's devices in id order: batch, state, and why a device failed.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/devices", tag = "rollouts",
    params(
        ("id" = String, Path, description = "The rollout id"),
        ("state" = inline(Option<RolloutDeviceState>), Query, description = "Only devices in this state"),
        ("batch" = Option<usize>, Query, description = "Only this batch's devices (from 0)"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (default 100)"),
        ("offset" = Option<u64>, Query, description = "Skip this many first"),
    ),
    responses(
        (status = 200, description = "The devices", body = Vec<contract::RolloutDevice>),
        (status = 400, description = "A parameter is not valid; `field` names it", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
    ))]
async fn rollout_devices(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<DevicesQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowRollout).await?;
    let id = rollout_id(&raw)?;
    let state = q
        .state
        .as_deref()
        .map(|s| {
            serde_json::from_value::<RolloutDeviceState>(serde_json::Value::String(s.into()))
                .map_err(|_| {
                    ApiError::field(
                        StatusCode::BAD_REQUEST,
                        "state",
                        format!("{s:?} is not a device state: pending, updating, ready, updated, failed, rolling_back, rolled_back or skipped"),
                    )
                })
        })
        .transpose()?;
    let number = |field: &str, v: Option<&str>| -> ApiResult<Option<usize>> {
        v.map(|s| {
            s.parse::<usize>().map_err(|_| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    field,
                    format!("`{field}` must be a whole number, got {s:?}"),
                )
            })
        })
        .transpose()
    };
    let batch = number("batch", q.batch.as_deref())?;
    let offset = number("offset", q.offset.as_deref())?.unwrap_or(0);
    let limit = parse_limit(q.limit.as_deref())?;
    match api
        .commands
        .engine
        .rollout_devices(id.clone(), state, batch, offset, limit)
        .await
        .map_err(ApiError::from)?
    {
        Some(d) => Ok(Json(d)),
        None => Err(no_rollout(&id)),
    }
}

/// Acts on a rollout: `pause` (start no more devices; those updating go
/// on), `resume` (after a pause by its failure policy this accepts the
/// batch's failures), `approve` (start the next batch when it waits for
/// approval), `abort` (stop; devices keep what they run, as overrides of
/// the app's assignment, which goes back to what it was), `rollback` (every
/// device it moved goes back to the release it ran before).
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts",
    params(
        ("id" = String, Path, description = "The rollout id"),
        ("action" = inline(RolloutAction), Path, description = "pause, resume, approve, abort or rollback"),
    ),
    responses(
        (status = 200, description = "The rollout after the action", body = contract::Rollout),
        (status = 400, description = "Not an action", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
        (status = 409, description = "The rollout's phase does not allow the action", body = ErrorBody),
    ))]
async fn rollout_action(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((raw, action)): Path<(String, String)>,
) -> ApiResult<Response> {
    let action: RolloutAction = action
        .parse()
        .map_err(|m: String| ApiError::field(StatusCode::BAD_REQUEST, "action", m))?;
    ctx.run(
        &api,
        CommandKind::of_rollout_action(action),
        StatusCode::OK,
        || {
            Ok(Command::RolloutAction {
                id: rollout_id(&raw)?,
                action,
            })
        },
    )
    .await
}
