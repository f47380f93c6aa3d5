//! REST endpoints over the history (`crate::history`): a device's
//! telemetry over a window and its containers' log lines. Reads only: the
//! role check is the command path's (`Ctx::authorize`), the data comes
//! from the history's own file, never through the engine.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use drover_shared::payload::LogLine;
use drover_shared::{DeviceId, Name};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{device_id, name, ApiError, ApiQuery, ApiResult, ApiState, Ctx};
use crate::contract::{ErrorBody, Resolution, TelemetrySeries};
use crate::core::command::CommandKind;
use crate::core::fleet::FleetError;
use crate::engine::EngineError;
use crate::history::{HistoryError, MAX_LOG_TAIL, MAX_POINTS};

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(telemetry))
        .routes(routes!(logs))
}

impl From<HistoryError> for ApiError {
    fn from(e: HistoryError) -> Self {
        match e {
            HistoryError::Invalid { field, message } => {
                ApiError::field(StatusCode::BAD_REQUEST, field, message)
            }
            e => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the history: {e}"),
            ),
        }
    }
}

/// 404 for a device the fleet does not know, as every device route says it.
async fn known(api: &ApiState, id: &DeviceId) -> ApiResult<()> {
    if api.commands.engine.has_device(id.clone()).await? {
        Ok(())
    } else {
        Err(EngineError::from(FleetError::UnknownDevice(id.clone())).into())
    }
}

/// A whole number in a query parameter, or a 400 naming it.
fn number(field: &'static str, raw: Option<&str>) -> ApiResult<Option<u64>> {
    raw.map(|v| {
        v.parse::<u64>().map_err(|_| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                field,
                format!("`{field}` must be a whole number, got {v:?}"),
            )
        })
    })
    .transpose()
}

#[derive(Debug, Deserialize)]
struct TelemetryQuery {
    since_ms: Option<String>,
    until_ms: Option<String>,
    resolution: Option<String>,
    limit: Option<String>,
}

/// A device's telemetry over a window, oldest point first: every sample
/// (`raw`, kept `--history-raw-hours`) or five-minute buckets with the
/// average and maximum of each metric (`5m`, kept `--history-days`).
/// `auto` (the default) is raw when raw samples reach back to `since_ms`.
/// At most 10,000 points a response; when the window holds more,
/// `next_since_ms` says where to go on.
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", tag = "devices",
    params(
        ("id" = DeviceId, Path, description = "The device id"),
        ("since_ms" = Option<u64>, Query, description = "Start of the window, Unix milliseconds, included (default: an hour before `until_ms`)"),
        ("until_ms" = Option<u64>, Query, description = "End of the window, Unix milliseconds, included (default: now)"),
        ("resolution" = Option<String>, Query, description = "`raw`, `5m` or `auto` (default)"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many points (default and most: 10000)"),
    ),
    responses(
        (status = 200, description = "The series", body = TelemetrySeries),
        (status = 400, description = "A parameter is not valid; `field` names it", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn telemetry(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<TelemetryQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowDevice).await?;
    let id = device_id(&id)?;
    let since = number("since_ms", q.since_ms.as_deref())?;
    let until = number("until_ms", q.until_ms.as_deref())?;
    let resolution = match q.resolution.as_deref() {
        None | Some("auto") => None,
        Some("raw") => Some(Resolution::Raw),
        Some("5m") => Some(Resolution::FiveMinutes),
        Some(other) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "resolution",
                format!("`resolution` must be raw, 5m or auto, got {other:?}"),
            ))
        }
    };
    let limit = match number("limit", q.limit.as_deref())? {
        None => MAX_POINTS,
        Some(n) if (1..=MAX_POINTS as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "limit",
                format!("`limit` must be between 1 and {MAX_POINTS}, got {n}"),
            ))
        }
    };
    known(&api, &id).await?;
    let series = api
        .history
        .telemetry(id, since, until, resolution, limit)
        .await?;
    Ok(Json(series))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    app: Option<String>,
    container: Option<String>,
    tail: Option<String>,
    since_ms: Option<String>,
}

/// The newest log lines of an app's containers on a device, oldest first,
/// with the agent's timestamps, from the history (the last
/// `--history-log-lines` per container, none older than
/// `--history-days`).
#[utoipa::path(get, path = "/api/v1/devices/{id}/logs", tag = "devices",
    params(
        ("id" = DeviceId, Path, description = "The device id"),
        ("app" = Name, Query, description = "The app whose logs to read"),
        ("container" = Option<Name>, Query, description = "Only this container of the app"),
        ("tail" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "How many lines, the newest (default 100, at most 10000)"),
        ("since_ms" = Option<u64>, Query, description = "Only lines at or after this time, Unix milliseconds (the agent's clock)"),
    ),
    responses(
        (status = 200, description = "Log lines", body = Vec<LogLine>),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn logs(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ReadLogs).await?;
    let id = device_id(&id)?;
    let app: Name = name(
        "app",
        q.app.as_deref().ok_or_else(|| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "app",
                "query parameter `app` is required",
            )
        })?,
    )?;
    let container = q
        .container
        .as_deref()
        .map(|c| name("container", c))
        .transpose()?;
    let tail = match q.tail.as_deref() {
        None => 100,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LOG_TAIL).contains(n))
            .ok_or_else(|| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    "tail",
                    format!("`tail` must be a whole number from 1 to {MAX_LOG_TAIL}, got {t:?}"),
                )
            })?,
    };
    let since = number("since_ms", q.since_ms.as_deref())?;
    known(&api, &id).await?;
    let lines: Vec<LogLine> = api
        .history
        .logs(&id, &app, container.as_ref(), since, tail)
        .await?;
    Ok(Json(lines))
}
