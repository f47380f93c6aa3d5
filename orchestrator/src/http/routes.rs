//! The router, and the handlers for devices, apps, operations, registries
//! and the change stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use drover_shared::model::AppSpec;
use drover_shared::payload::{DeviceEvent, Op, RegistryCredential};
use drover_shared::{DeviceId, Name};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{
    device_id, name, parse_body, parse_limit, ApiError, ApiQuery, ApiResult, ApiState, Ctx,
};
use crate::contract::{self, Change, ChangeFilter, DeployRequest, ErrorBody, RegistryCredentials};
use crate::core::command::{Command, CommandKind};
use crate::core::fleet::DeviceQuery;
use crate::core::registries;
use crate::core::selector::Selector;

/// axum's default body limit, which every JSON body here is far below.
pub(crate) const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The longest `?wait=` a request may ask for.
const MAX_WAIT_SECS: u64 = 300;

/// The router, with the OpenAPI document it serves at
/// `/api/v1/openapi.json`. Every route is registered through its handler's
/// `#[utoipa::path]`, which names the path and method once for both, so the
/// router and the document cannot disagree.
pub fn router(api: ApiState) -> Router {
    let (router, doc) = routes()
        // A route layer, so the check knows which route matched.
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            super::auth::authenticate,
        ))
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint; see /api/v1/openapi.json for every endpoint of this API",
            )
        })
        .split_for_parts();
    // Serialized once: the document cannot change while the server runs.
    let json = serde_json::to_string(&super::openapi::finish(doc))
        .expect("the OpenAPI document is plain data and always serializes");
    let doc = OpenApiJson(Arc::from(json));
    router
        .layer(Extension(doc))
        .layer(axum::middleware::map_response(json_client_errors))
        .with_state(api)
}

/// The OpenAPI document alone, as `/api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    super::openapi::finish(routes().into_openapi())
}

/// Every route with its handler and description.
fn routes() -> OpenApiRouter<ApiState> {
    let router = OpenApiRouter::with_openapi(super::openapi::ApiDoc::openapi());
    super::console::routes(router)
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(list_devices))
        .routes(routes!(show_device))
        .routes(routes!(patch_labels, put_labels))
        .routes(routes!(deploy))
        .routes(routes!(remove))
        .routes(routes!(start))
        .routes(routes!(stop))
        .routes(routes!(pause))
        .routes(routes!(unpause))
        .routes(routes!(restart))
        .routes(routes!(events))
        .routes(routes!(list_apps, create_app))
        .routes(routes!(import_app))
        .routes(routes!(show_app, update_app, delete_app))
        .routes(routes!(list_releases))
        .routes(routes!(show_release))
        .routes(routes!(put_assignment, show_assignment, delete_assignment))
        .routes(routes!(clear_override))
        .routes(routes!(list_operations))
        .routes(routes!(show_operation))
        .routes(routes!(changes))
        .routes(routes!(list_registries))
        .routes(routes!(show_registry, put_registry, delete_registry))
        .merge(super::agent_releases::routes())
        .merge(super::history::routes())
        .merge(super::rollouts::routes())
        .merge(super::jobs::routes())
        .merge(super::rules::routes())
        .merge(super::security::routes())
}

/// The serialized document, built once with the router.
#[derive(Clone)]
struct OpenApiJson(Arc<str>);

/// axum's own rejections (a body over the limit, a method the route does
/// not take, a path that is not UTF-8) are plain text or empty: every 4xx
/// of this API is its JSON error, saying what was wrong.
async fn json_client_errors(method: axum::http::Method, resp: Response) -> Response {
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if json || !status.is_client_error() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "request body is larger than the API's limit of {} bytes",
            MAX_BODY_BYTES
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("this endpoint does not take {method}; the Allow header lists what it takes")
        }
        _ if !text.is_empty() => text,
        _ => status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_lowercase(),
    };
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let error = ApiError::new(status, message).into_response();
    let (error_parts, body) = error.into_parts();
    parts.headers.extend(error_parts.headers);
    parts.extensions.extend(error_parts.extensions);
    Response::from_parts(parts, body)
}

/// Health: `ok`, or 503 naming what does not work (the store cannot be
/// written, now or in the last few seconds).
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses(
        (status = 200, description = "The server is up and its store writable", body = String, content_type = "text/plain"),
        (status = 503, description = "Unhealthy: says why (e.g. the store cannot be written)", body = String, content_type = "text/plain"),
    ))]
async fn healthz(State(api): State<ApiState>) -> Response {
    match api.commands.store_health() {
        Ok(()) => "ok\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: store: {e}\n"),
        )
            .into_response(),
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)))]
async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
}

/// Prometheus metrics: OpenMetrics text when the `Accept` header asks for
/// it (Prometheus does), else the Prometheus text format 0.0.4.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses(
        (status = 200, description = "OpenMetrics text 1.0.0 (`Accept: application/openmetrics-text`) or the Prometheus text exposition format 0.0.4",
         content(
            (String = "text/plain"),
            (String = "application/openmetrics-text"),
         )),
        (status = 503, description = "The engine is not running (starting or stopping)", body = ErrorBody),
    ))]
async fn metrics(
    State(api): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let m = api.commands.metrics.clone();
    let per_device = m.per_device();
    // One pass over the devices on the engine task (no views built), and
    // the rollouts; encoding happens here, off the engine.
    let fleet = api
        .commands
        .engine
        .read(move |f, _| f.gauges(per_device))
        .await?;
    let rollouts = api.commands.engine.rollouts(None).await?;
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(crate::metrics::wants_openmetrics);
    let content_type = if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        crate::metrics::TEXT_CONTENT_TYPE
    };
    Ok((
        [(axum::http::header::CONTENT_TYPE, content_type)],
        m.render(fleet, &rollouts, openmetrics),
    ))
}

// ----- devices -----------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct DevicesQuery {
    selector: Option<String>,
    status: Option<String>,
    q: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

/// The longest `?q=` text a device list takes.
const MAX_QUERY_TEXT: usize = 256;

/// The header with the number of devices a list matched, before paging.
pub(crate) const TOTAL_COUNT: &str = "x-total-count";

/// The devices the orchestrator knows, in id order, optionally only those
/// that match every filter given, one page at a time. The body is the page
/// (every match without `limit`); `X-Total-Count` says how many matched.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    params(
        ("selector" = Option<String>, Query, description = "A Kubernetes-style label selector, e.g. `env=prod,region in (eu,us),!canary`; matched against each device's effective labels"),
        ("status" = Option<String>, Query, pattern = "^(online|offline)$", description = "Only devices online now (`online`) or not (`offline`)"),
        ("q" = Option<String>, Query, max_length = 256, description = "Only devices whose id or hostname contains this text, ignoring case"),
        ("offset" = Option<u64>, Query, minimum = 0, description = "Skip this many matching devices (default 0)"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many devices (default: every match)"),
    ),
    responses(
        (status = 200, description = "The devices (one page of them with `limit`/`offset`)", body = Vec<contract::Device>,
         headers(("X-Total-Count" = u64, description = "How many devices match the filters, before `offset` and `limit`"))),
        (status = 400, description = "A parameter is not valid (e.g. the selector; the message says where)", body = ErrorBody),
    ))]
async fn list_devices(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<DevicesQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListDevices).await?;
    let selector = q.selector.as_deref().map(parse_selector).transpose()?;
    let online = match q.status.as_deref() {
        None => None,
        Some("online") => Some(true),
        Some("offline") => Some(false),
        Some(other) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "status",
                format!("`status` must be `online` or `offline`, got {other:?}"),
            ))
        }
    };
    let text = q.q.filter(|t| !t.is_empty());
    if text
        .as_ref()
        .is_some_and(|t| t.chars().count() > MAX_QUERY_TEXT)
    {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "q",
            format!("`q` is at most {MAX_QUERY_TEXT} characters"),
        ));
    }
    let offset = match q.offset.as_deref() {
        None => 0,
        Some(o) => o.parse::<usize>().map_err(|_| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "offset",
                format!("`offset` must be a whole number from 0, got {o:?}"),
            )
        })?,
    };
    let limit = q
        .limit
        .as_deref()
        .map(|l| parse_limit(Some(l)))
        .transpose()?;
    let page = api
        .commands
        .engine
        .device_page(DeviceQuery {
            selector,
            online,
            text,
            offset,
            limit,
        })
        .await?;
    let mut views = page.devices;
    for v in &mut views {
        v.credential = Some(api.commands.identities.credential_state(&v.id));
    }
    Ok(([(TOTAL_COUNT, page.total.to_string())], Json(views)))
}

fn parse_selector(s: &str) -> ApiResult<Selector> {
    Selector::parse(s).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "selector",
            format!("selector {s:?} is not valid: {e}"),
        )
    })
}

/// Changes a device's operator-set labels: sets the keys in `set`,
/// removes those in `remove`. Operator-set labels win over the device's
/// own on a key both set.
#[utoipa::path(patch, path = "/api/v1/devices/{id}/labels", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id")),
    request_body = contract::LabelsPatch,
    responses(
        (status = 200, description = "The device with its new labels", body = contract::Device),
        (status = 400, description = "A label key or value is not valid; `field` names it", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn patch_labels(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::SetLabels, StatusCode::OK, || {
        let device = device_id(&id)?;
        let body: contract::LabelsPatch = parse_body(&body)?;
        Ok(Command::SetLabels {
            device,
            set: body.set,
            remove: body.remove,
            replace: false,
        })
    })
    .await
}

/// Replaces a device's operator-set labels with `labels` (its own,
/// device-set labels stay).
#[utoipa::path(put, path = "/api/v1/devices/{id}/labels", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id")),
    request_body = contract::LabelsPut,
    responses(
        (status = 200, description = "The device with its new labels", body = contract::Device),
        (status = 400, description = "A label key or value is not valid; `field` names it", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn put_labels(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::SetLabels, StatusCode::OK, || {
        let device = device_id(&id)?;
        let body: contract::LabelsPut = parse_body(&body)?;
        Ok(Command::SetLabels {
            device,
            set: body.labels,
            remove: Vec::new(),
            replace: true,
        })
    })
    .await
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device", body = contract::Device),
        (status = 400, description = "The device id is not valid", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn show_device(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowDevice).await?;
    let id = device_id(&id)?;
    let mut view = api
        .commands
        .engine
        .device(id.clone())
        .await?
        .ok_or_else(|| {
            ApiError::field(
                StatusCode::NOT_FOUND,
                "device",
                format!("device {id} is not known"),
            )
        })?;
    view.credential = Some(api.commands.identities.credential_state(&id));
    Ok(Json(view))
}

/// Deploys an app to a device (or redeploys its current spec).
#[utoipa::path(post, path = "/api/v1/devices/{id}/apps", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id")),
    request_body = DeployRequest,
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or the body is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app conflicts with the device: a host port another app publishes, more CPUs than it has, or an image that does not provide the device's platform (`field` is `image`; the message names the image, the platforms it provides and the device's)", body = ErrorBody),
    ))]
async fn deploy(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::Deploy, StatusCode::ACCEPTED, || {
        let device = device_id(&id)?;
        let body: DeployRequest = parse_body(&body)?;
        Ok(Command::Apply {
            device,
            app: body.app,
            op: Op::Deploy,
        })
    })
    .await
}

async fn apply(api: ApiState, ctx: Ctx, id: String, app: String, op: Op) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::of_op(op), StatusCode::ACCEPTED, || {
        Ok(Command::Apply {
            device: device_id(&id)?,
            app: name("app", &app)?,
            op,
        })
    })
    .await
}

/// Starts an app deployed on a device.
#[utoipa::path(post, path = "/api/v1/devices/{id}/apps/{app}/start", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app is not deployed on the device", body = ErrorBody),
    ))]
async fn start(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    apply(api, ctx, id, app, Op::Start).await
}

/// Stops an app deployed on a device.
#[utoipa::path(post, path = "/api/v1/devices/{id}/apps/{app}/stop", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app is not deployed on the device", body = ErrorBody),
    ))]
async fn stop(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    apply(api, ctx, id, app, Op::Stop).await
}

/// Pauses an app deployed on a device: its containers' processes are
/// frozen (`docker pause`) and keep their memory.
#[utoipa::path(post, path = "/api/v1/devices/{id}/apps/{app}/pause", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app is not deployed on the device", body = ErrorBody),
    ))]
async fn pause(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    apply(api, ctx, id, app, Op::Pause).await
}

/// Thaws a paused app on a device.
#[utoipa::path(post, path = "/api/v1/devices/{id}/apps/{app}/unpause", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app is not deployed on the device, or not paused", body = ErrorBody),
    ))]
async fn unpause(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    apply(api, ctx, id, app, Op::Unpause).await
}

/// Restarts a running app on a device: its containers are restarted in
/// start order (`docker restart`) and kept. Carried in the desired state
/// (`restarted_at`), so a device that was offline restarts the app when it
/// comes back, once.
#[utoipa::path(post, path = "/api/v1/devices/{id}/apps/{app}/restart", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app is not deployed on the device, or it is stopped or paused", body = ErrorBody),
    ))]
async fn restart(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    apply(api, ctx, id, app, Op::Restart).await
}

/// Removes an app deployed on a device.
#[utoipa::path(delete, path = "/api/v1/devices/{id}/apps/{app}", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 202, description = "The desired state changed; follow the operation", body = contract::Operation),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device or app", body = ErrorBody),
        (status = 409, description = "The app is not deployed on the device", body = ErrorBody),
    ))]
async fn remove(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    apply(api, ctx, id, app, Op::Remove).await
}

/// A deploy or removal by hand of an app that has an assignment makes the
/// device override it; this clears that, and the assignment applies to the
/// device again at once.
#[utoipa::path(delete, path = "/api/v1/devices/{id}/apps/{app}/override", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device id"), ("app" = Name, Path, description = "The app name")),
    responses(
        (status = 200, description = "The device, now following the app's assignment", body = contract::Device),
        (status = 400, description = "The device id or app name is not valid", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn clear_override(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::ClearOverride, StatusCode::OK, || {
        Ok(Command::ClearOverride {
            device: device_id(&id)?,
            app: name("app", &app)?,
        })
    })
    .await
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<String>,
}

/// What the device's agent did on its own, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices",
    params(
        ("id" = DeviceId, Path, description = "The device id"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (default 100)"),
    ),
    responses(
        (status = 200, description = "Events", body = Vec<DeviceEvent>),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
async fn events(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ReadEvents).await?;
    let id = device_id(&id)?;
    let limit = parse_limit(q.limit.as_deref())?;
    let events = api
        .commands
        .engine
        .events(id, limit)
        .await?
        .map_err(|e| ApiError::from(crate::engine::EngineError::from(e)))?;
    Ok(Json(events))
}

// ----- apps ----------------------------------------------------------------------

/// Every app.
#[utoipa::path(get, path = "/api/v1/apps", tag = "apps",
    responses((status = 200, description = "All apps", body = Vec<contract::App>)))]
async fn list_apps(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListApps).await?;
    let apps = api.commands.engine.apps().await?;
    Ok(Json(
        apps.iter().map(contract::App::from).collect::<Vec<_>>(),
    ))
}

/// Defines an app.
#[utoipa::path(post, path = "/api/v1/apps", tag = "apps",
    request_body = AppSpec,
    responses(
        (status = 201, description = "The app was created", body = contract::App),
        (status = 400, description = "The spec is not valid; `field` names what", body = ErrorBody),
        (status = 409, description = "An app of that name exists", body = ErrorBody),
    ))]
async fn create_app(State(api): State<ApiState>, ctx: Ctx, body: Bytes) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::CreateApp, StatusCode::CREATED, || {
        Ok(Command::CreateApp(parse_body::<AppSpec>(&body)?))
    })
    .await
}

/// The media types a Compose file may be sent as.
const YAML_TYPES: [&str; 4] = [
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/plain",
];

#[derive(Debug, Deserialize)]
struct ImportQuery {
    name: Option<String>,
    replace: Option<String>,
}

/// Defines an app from a Compose file: services become containers (image,
/// command, environment, ports, named volumes, absolute bind mounts,
/// restart, healthcheck, depends_on, resource limits, and the device
/// access keys). Every other key is refused by its path (`field`), never
/// ignored; `x-` extension keys are ignored, as Compose does.
#[utoipa::path(post, path = "/api/v1/apps/import", tag = "apps",
    params(
        ("name" = Option<Name>, Query, description = "The app's name; without it, the file's top-level `name:`"),
        ("replace" = Option<bool>, Query, description = "Replace the spec of an existing app of that name (default false: an existing app is a conflict)"),
    ),
    request_body(description = "A Compose file (YAML), at most 256 KiB",
        content(
            (String = "application/yaml"),
            (String = "application/x-yaml"),
            (String = "text/yaml"),
            (String = "text/plain"),
        )),
    responses(
        (status = 201, description = "The app was created", body = contract::App),
        (status = 200, description = "The app existed and its spec was replaced (`replace=true`)", body = contract::App),
        (status = 400, description = "The file is not valid YAML (the message gives line and column), or uses a key Drover does not support, or a value is not valid; `field` names the key by its path (`services.web.build`)", body = ErrorBody),
        (status = 409, description = "An app of that name exists and `replace` is not true", body = ErrorBody),
        (status = 413, description = "The file is larger than 256 KiB", body = ErrorBody),
        (status = 415, description = "The body is not sent as YAML (application/yaml, application/x-yaml, text/yaml or text/plain)", body = ErrorBody),
    ))]
async fn import_app(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<ImportQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    use crate::core::compose::{self, MAX_COMPOSE_BYTES};
    // Nothing is read or parsed for a caller who may not import.
    ctx.authorize(&api, CommandKind::ImportApp).await?;
    let media = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if !media.as_deref().is_some_and(|m| YAML_TYPES.contains(&m)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "a Compose file is sent as {}; got {}",
                YAML_TYPES.join(", "),
                media.map_or("no Content-Type".to_string(), |m| format!("{m:?}"))
            ),
        ));
    }
    let bytes = super::read_body(&headers, body, MAX_COMPOSE_BYTES, "the Compose file").await?;
    let replace = match q.replace.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "replace",
                format!("`replace` must be true or false, got {other:?}"),
            ))
        }
    };
    ctx.run(&api, CommandKind::ImportApp, StatusCode::CREATED, || {
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the Compose file is not UTF-8 text: {e}"),
            )
        })?;
        let spec = compose::import(text, q.name.as_deref()).map_err(|e| {
            if e.field.is_empty() {
                ApiError::new(StatusCode::BAD_REQUEST, e.message)
            } else {
                ApiError::field(StatusCode::BAD_REQUEST, e.field.clone(), e.to_string())
            }
        })?;
        Ok(Command::ImportApp { spec, replace })
    })
    .await
}

/// Replaces an app's spec. Devices pick it up when it is deployed again.
#[utoipa::path(put, path = "/api/v1/apps/{name}", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    request_body = AppSpec,
    responses(
        (status = 200, description = "The spec was replaced", body = contract::App),
        (status = 400, description = "The spec is not valid, or names another app", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
    ))]
async fn update_app(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::UpdateApp, StatusCode::OK, || {
        let n = name("app", &n)?;
        let spec: AppSpec = parse_body(&body)?;
        if spec.name != n {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "name",
                format!(
                    "body names app {:?} but the path names {:?}",
                    spec.name.as_str(),
                    n.as_str()
                ),
            ));
        }
        Ok(Command::UpdateApp(spec))
    })
    .await
}

/// One app.
#[utoipa::path(get, path = "/api/v1/apps/{name}", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    responses(
        (status = 200, description = "The app", body = contract::App),
        (status = 400, description = "The app name is not valid", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
    ))]
async fn show_app(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowApp).await?;
    let n = name("app", &n)?;
    let rec = api.commands.engine.app(n.clone()).await?.ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "app",
            format!("app {n} does not exist"),
        )
    })?;
    Ok(Json(contract::App::from(&rec)))
}

/// An app's kept releases, oldest first.
#[utoipa::path(get, path = "/api/v1/apps/{name}/releases", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    responses(
        (status = 200, description = "The app's releases, oldest first", body = Vec<contract::Release>),
        (status = 400, description = "The app name is not valid", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
    ))]
async fn list_releases(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowApp).await?;
    let rec = app_record(&api, &n).await?;
    Ok(Json(
        rec.releases
            .iter()
            .map(contract::Release::from)
            .collect::<Vec<_>>(),
    ))
}

/// One release of an app.
#[utoipa::path(get, path = "/api/v1/apps/{name}/releases/{number}", tag = "apps",
    params(("name" = Name, Path, description = "The app name"), ("number" = u64, Path, description = "The release number")),
    responses(
        (status = 200, description = "The release", body = contract::Release),
        (status = 400, description = "The app name or number is not valid", body = ErrorBody),
        (status = 404, description = "No such app or release", body = ErrorBody),
    ))]
async fn show_release(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((n, number)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowApp).await?;
    let number: u64 = number.parse().map_err(|_| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "number",
            format!("release number {number:?} is not a whole number"),
        )
    })?;
    let rec = app_record(&api, &n).await?;
    let release = rec.release(number).ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "number",
            format!(
                "app {} has no release {number} (latest: {})",
                rec.spec.name,
                rec.latest_release()
            ),
        )
    })?;
    Ok(Json(contract::Release::from(release)))
}

async fn app_record(api: &ApiState, n: &str) -> ApiResult<crate::core::records::AppRecord> {
    let n = name("app", n)?;
    api.commands.engine.app(n.clone()).await?.ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "app",
            format!("app {n} does not exist"),
        )
    })
}

/// Puts the app at a release on every device whose labels match the
/// selector, now and as devices enroll or are relabelled; devices that stop
/// matching lose it. One assignment per app: this replaces any other.
#[utoipa::path(put, path = "/api/v1/apps/{name}/assignment", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    request_body = contract::AssignmentRequest,
    responses(
        (status = 200, description = "The assignment holds; the devices it covers", body = contract::Assignment),
        (status = 400, description = "The selector or body is not valid; `field` names it", body = ErrorBody),
        (status = 404, description = "No such app or release", body = ErrorBody),
        (status = 409, description = "A rollout of the app is running, or an image does not provide the platform of a device the selector matches (`field` is `image`; the message names the devices)", body = ErrorBody),
    ))]
async fn put_assignment(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::Assign, StatusCode::OK, || {
        let app = name("app", &n)?;
        let body: contract::AssignmentRequest = parse_body(&body)?;
        Ok(Command::Assign {
            app,
            selector: body.selector,
            release: body.release,
            run: body.run,
        })
    })
    .await
}

/// The app's assignment and the devices it covers.
#[utoipa::path(get, path = "/api/v1/apps/{name}/assignment", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    responses(
        (status = 200, description = "The assignment", body = contract::Assignment),
        (status = 400, description = "The app name is not valid", body = ErrorBody),
        (status = 404, description = "No such app, or it has no assignment", body = ErrorBody),
    ))]
async fn show_assignment(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowApp).await?;
    let app = name("app", &n)?;
    app_record(&api, &n).await?;
    Ok(Json(api.commands.assignment(app).await?))
}

/// Deletes the app's assignment and removes the app from the devices it
/// put it on (devices that override it keep what they have).
#[utoipa::path(delete, path = "/api/v1/apps/{name}/assignment", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    responses(
        (status = 204, description = "The assignment is gone"),
        (status = 400, description = "The app name is not valid", body = ErrorBody),
        (status = 404, description = "No such app, or it has no assignment", body = ErrorBody),
    ))]
async fn delete_assignment(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::Unassign, StatusCode::NO_CONTENT, || {
        Ok(Command::Unassign(name("app", &n)?))
    })
    .await
}

/// Deletes an app that is deployed nowhere.
#[utoipa::path(delete, path = "/api/v1/apps/{name}", tag = "apps",
    params(("name" = Name, Path, description = "The app name")),
    responses(
        (status = 204, description = "The app was deleted"),
        (status = 400, description = "The app name is not valid", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
        (status = 409, description = "The app is still deployed somewhere", body = ErrorBody),
    ))]
async fn delete_app(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::DeleteApp, StatusCode::NO_CONTENT, || {
        Ok(Command::DeleteApp(name("app", &n)?))
    })
    .await
}

// ----- operations ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct OpsQuery {
    device: Option<String>,
    limit: Option<String>,
}

/// Operations, newest first.
#[utoipa::path(get, path = "/api/v1/operations", tag = "operations",
    params(
        ("device" = Option<DeviceId>, Query, description = "Only this device's operations"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (default 100)"),
    ),
    responses(
        (status = 200, description = "Operations", body = Vec<contract::Operation>),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
    ))]
async fn list_operations(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<OpsQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListOperations).await?;
    let device = q.device.as_deref().map(device_id).transpose()?;
    let limit = parse_limit(q.limit.as_deref())?;
    let ops = api.commands.engine.operations(device, limit).await?;
    Ok(Json(
        ops.iter()
            .map(contract::Operation::from)
            .collect::<Vec<_>>(),
    ))
}

#[derive(Debug, Deserialize)]
struct OpQuery {
    /// Seconds to wait for the operation to end before answering.
    wait: Option<String>,
}

/// One operation. With `?wait=SECS` the answer comes when the operation
/// has ended (or the time is up, or the server stops), followed through
/// the engine's change stream rather than by polling.
#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "operations",
    params(
        ("id" = String, Path, description = "The operation id"),
        ("wait" = Option<u64>, Query, minimum = 0, maximum = 300,
         description = "Answer only once the operation has ended, or after this many seconds"),
    ),
    responses(
        (status = 200, description = "The operation", body = contract::Operation),
        (status = 400, description = "`wait` is not valid", body = ErrorBody),
        (status = 404, description = "No such operation", body = ErrorBody),
    ))]
async fn show_operation(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<OpQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowOperation).await?;
    let wait = match q.wait.as_deref() {
        None => None,
        Some(w) => Some(
            w.parse::<u64>()
                .ok()
                .filter(|s| *s <= MAX_WAIT_SECS)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    ApiError::field(
                        StatusCode::BAD_REQUEST,
                        "wait",
                        format!("`wait` must be a whole number of seconds from 0 to {MAX_WAIT_SECS}, got {w:?}"),
                    )
                })?,
        ),
    };
    let not_found = || {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "operation",
            format!("operation {id:?} does not exist"),
        )
    };
    // Subscribe before reading, so no change between the two is missed.
    let mut changes = api.commands.engine.subscribe();
    let mut op: contract::Operation =
        (&api.commands.operation(&id).await?.ok_or_else(not_found)?).into();
    let Some(wait) = wait else {
        return Ok(Json(op));
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut stopping = api.stopping.clone();
    while !op.status.is_final() {
        let next = tokio::select! {
            next = changes.recv() => next,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = stopping.wait_for(|s| *s) => break,
        };
        match next.as_deref() {
            Ok(Change::Operation { operation }) if operation.id == id => {
                op = operation.as_ref().clone()
            }
            Ok(_) => {}
            // Fell behind: what we hold may be stale; read it again.
            Err(RecvError::Lagged(_)) => {
                if let Some(rec) = api.commands.operation(&id).await? {
                    op = (&rec).into();
                }
            }
            Err(RecvError::Closed) => break,
        }
    }
    Ok(Json(op))
}

#[derive(Debug, Deserialize)]
struct ChangesQuery {
    /// Only this device's changes.
    device: Option<String>,
    /// Only this operation's progress and outcome.
    operation: Option<String>,
    /// Only this rollout's progress and outcome.
    rollout: Option<String>,
    /// Only this edge job's progress and outcome.
    job: Option<String>,
    /// Merge device-level changes per device to one per kind per second.
    coalesce: Option<String>,
    /// Only these kinds, comma-separated.
    kinds: Option<String>,
}

/// The fleet's changes as server-sent events, one JSON object each (see
/// `contract::Change`), optionally only one device's or one operation's
/// (`contract::ChangeFilter`). A client that falls behind gets a `lagged`
/// event and should read what it shows again. The subscription exists once
/// the response headers are sent, so a client that reads a snapshot after
/// them misses nothing.
#[utoipa::path(get, path = "/api/v1/changes", tag = "changes",
    params(
        ("device" = Option<DeviceId>, Query, description = "Only this device's changes"),
        ("operation" = Option<String>, Query, description = "Only this operation's changes"),
        ("rollout" = Option<String>, Query, description = "Only this rollout's changes"),
        ("job" = Option<String>, Query, description = "Only this edge job's changes"),
        ("kinds" = Option<String>, Query, description = "Only changes of these kinds, comma-separated (`lagged` always passes): device, inventory, state, operation, telemetry, logs, event, app, rollout, job"),
        ("coalesce" = Option<bool>, Query, description = "Merge each device's `device`, `inventory`, `state` and `telemetry` changes to the latest of each kind, sent once a second (the console's feed); the rest is sent at once"),
    ),
    responses(
        (status = 200, description = "Server-sent events, each one `Change` as JSON in its `data`; the stream stays open",
         body = Change, content_type = "text/event-stream"),
        (status = 400, description = "A filter is not valid", body = ErrorBody),
        (status = 404, description = "No such operation, rollout or job", body = ErrorBody),
    ))]
async fn changes(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::WatchChanges).await?;
    let coalesce = match q.coalesce.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "coalesce",
                format!("`coalesce` is true or false, got {other:?}"),
            ))
        }
    };
    let filter = ChangeFilter {
        device: q.device.as_deref().map(device_id).transpose()?,
        operation: q.operation,
        rollout: q.rollout,
        job: q.job,
        kinds: q
            .kinds
            .as_deref()
            .map(Change::parse_kinds)
            .transpose()
            .map_err(|m| ApiError::field(StatusCode::BAD_REQUEST, "kinds", m))?,
    };
    let rx = api.commands.engine.subscribe();
    // An operation that does not exist would give a stream that never says
    // anything: refuse it, after subscribing, so one created in between counts.
    if let Some(id) = &filter.operation {
        if api.commands.operation(id).await?.is_none() {
            return Err(ApiError::field(
                StatusCode::NOT_FOUND,
                "operation",
                format!("operation {id:?} does not exist"),
            ));
        }
    }
    if let Some(id) = &filter.rollout {
        if api
            .commands
            .engine
            .rollout(id.clone())
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::field(
                StatusCode::NOT_FOUND,
                "rollout",
                format!("rollout {id:?} does not exist"),
            ));
        }
    }
    if let Some(id) = &filter.job {
        if api
            .commands
            .engine
            .job(id.clone())
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::field(
                StatusCode::NOT_FOUND,
                "job",
                format!("job {id:?} does not exist"),
            ));
        }
    }
    let stopping = api.stopping.clone();
    let mut flush = tokio::time::interval(COALESCE_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Feed {
        rx,
        stopping,
        filter,
        coalescer: coalesce.then(contract::Coalescer::default),
        ready: std::collections::VecDeque::new(),
        flush,
    };
    let stream = futures_util::stream::unfold(state, |mut f| async move {
        let change = f.next().await?;
        let event = SseEvent::default()
            .json_data(&*change)
            .unwrap_or_else(|_| SseEvent::default().data("{}"));
        Some((Ok::<_, Infallible>(event), f))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// How often a coalescing subscriber gets its merged device changes.
const COALESCE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One subscriber of `GET /api/v1/changes`.
struct Feed {
    rx: tokio::sync::broadcast::Receiver<Arc<Change>>,
    stopping: tokio::sync::watch::Receiver<bool>,
    filter: ChangeFilter,
    coalescer: Option<contract::Coalescer>,
    /// Changes ready to send, in order.
    ready: std::collections::VecDeque<Arc<Change>>,
    flush: tokio::time::Interval,
}

impl Feed {
    /// The next change to send; `None` when the stream ends.
    async fn next(&mut self) -> Option<Arc<Change>> {
        loop {
            if let Some(c) = self.ready.pop_front() {
                return Some(c);
            }
            let pending = self.coalescer.as_ref().is_some_and(|c| !c.is_empty());
            let change = tokio::select! {
                next = self.rx.recv() => match next {
                    Ok(c) => c,
                    Err(RecvError::Lagged(missed)) => Arc::new(Change::Lagged { missed }),
                    Err(RecvError::Closed) => return None,
                },
                _ = self.flush.tick(), if pending => {
                    if let Some(c) = self.coalescer.as_mut() {
                        self.ready.extend(c.drain());
                    }
                    continue;
                }
                _ = self.stopping.wait_for(|s| *s) => return None,
            };
            if !self.filter.matches(&change) {
                continue;
            }
            match self.coalescer.as_mut() {
                Some(c) => {
                    if let Some(now) = c.offer(change) {
                        return Some(now);
                    }
                }
                None => return Some(change),
            }
        }
    }
}

// ----- registry credentials ------------------------------------------------------
//
// Responses show the host, the username and `password_set`, never the
// password; the request body is not echoed back in errors either.

fn registry_host(raw: &str) -> ApiResult<String> {
    registries::validate_host(raw)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field, e.to_string()))
}

/// Every registry with stored credentials.
#[utoipa::path(get, path = "/api/v1/registries", tag = "registries",
    responses((status = 200, description = "Registries (never their passwords)", body = Vec<contract::Registry>)))]
async fn list_registries(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListRegistries).await?;
    Ok(Json(api.commands.engine.registries().await?))
}

/// One registry's stored credentials (never the password).
#[utoipa::path(get, path = "/api/v1/registries/{host}", tag = "registries",
    params(("host" = String, Path, min_length = 1, max_length = 255,
        pattern = r"^[A-Za-z0-9\[]([A-Za-z0-9.:\[\]-]*[A-Za-z0-9\]])?$",
        description = "The registry host as in image references, `host[:port]` (IPv6 in brackets)")),
    responses(
        (status = 200, description = "The registry", body = contract::Registry),
        (status = 400, description = "The host is not valid", body = ErrorBody),
        (status = 404, description = "No credentials for that host", body = ErrorBody),
    ))]
async fn show_registry(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(host): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowRegistry).await?;
    let host = registry_host(&host)?;
    let view = api
        .commands
        .engine
        .registry(host.clone())
        .await?
        .ok_or_else(|| {
            ApiError::field(
                StatusCode::NOT_FOUND,
                "host",
                format!("no credentials stored for registry {host}"),
            )
        })?;
    Ok(Json(view))
}

/// Stores (or replaces) a registry's credentials; devices that pull from it get them.
#[utoipa::path(put, path = "/api/v1/registries/{host}", tag = "registries",
    params(("host" = String, Path, min_length = 1, max_length = 255,
        pattern = r"^[A-Za-z0-9\[]([A-Za-z0-9.:\[\]-]*[A-Za-z0-9\]])?$",
        description = "The registry host as in image references, `host[:port]` (IPv6 in brackets)")),
    request_body = RegistryCredentials,
    responses(
        (status = 200, description = "Stored", body = contract::Registry),
        (status = 400, description = "The host or the body is not valid", body = ErrorBody),
    ))]
async fn put_registry(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(host): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::SetRegistry, StatusCode::OK, || {
        let host = registry_host(&host)?;
        // Parse errors name the field but never quote the value: it may be
        // the password.
        let body: RegistryCredentials = parse_body(&body).map_err(|e| {
            let field = e.field.clone();
            let message = match &field {
                Some(f) => format!(
                    "invalid field `{f}`: expected {{\"username\": string, \"password\": string}}"
                ),
                None => {
                    "invalid request body: expected {\"username\": string, \"password\": string}"
                        .to_string()
                }
            };
            ApiError {
                message,
                field,
                ..e
            }
        })?;
        registries::validate_credentials(&body)
            .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field, e.to_string()))?;
        Ok(Command::SetRegistry(RegistryCredential {
            host,
            username: body.username,
            password: body.password,
        }))
    })
    .await
}

/// Deletes a registry's credentials.
#[utoipa::path(delete, path = "/api/v1/registries/{host}", tag = "registries",
    params(("host" = String, Path, min_length = 1, max_length = 255,
        pattern = r"^[A-Za-z0-9\[]([A-Za-z0-9.:\[\]-]*[A-Za-z0-9\]])?$",
        description = "The registry host as in image references, `host[:port]` (IPv6 in brackets)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The host is not valid", body = ErrorBody),
        (status = 404, description = "No credentials for that host", body = ErrorBody),
    ))]
async fn delete_registry(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(host): Path<String>,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::DeleteRegistry,
        StatusCode::NO_CONTENT,
        || Ok(Command::DeleteRegistry(registry_host(&host)?)),
    )
    .await
}
