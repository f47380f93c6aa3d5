//! The REST API (JSON over HTTP). Errors are JSON objects that name the
//! offending field: `{"error": {"status": 400, "message": "...", "field": "..."}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use drover_shared::model::AppSpec;
use drover_shared::payload::Op;
use drover_shared::{DeviceId, Name};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::access::AuditDetail;
use crate::fleet::FleetError;
use crate::records::AppView;
use crate::registries::{self, CredentialsBody};
use crate::service::{Service, ServiceError};

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub status: u16,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn store(s: crate::store::StoreError) -> Self {
        tracing::error!(error = %s, "store failure");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the change could not be stored; nothing was changed",
        )
    }
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub(crate) fn field(
        status: StatusCode,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: Some(field.into()),
        }
    }
    fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The audit log says why a change failed. Messages never quote a
        // password (see `put_registry`).
        let detail = AuditDetail(self.message.clone());
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Extension(detail), Json(body)).into_response()
    }
}

/// An audit detail naming what a request changed.
pub(crate) fn audited(detail: impl Into<String>) -> Extension<AuditDetail> {
    Extension(AuditDetail(detail.into()))
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Fleet(f) => {
                let msg = f.to_string();
                match f {
                    FleetError::UnknownDevice(_) => {
                        ApiError::field(StatusCode::NOT_FOUND, "device", msg)
                    }
                    FleetError::UnknownApp(_) => ApiError::field(StatusCode::NOT_FOUND, "app", msg),
                    FleetError::AppExists(_) => ApiError::field(StatusCode::CONFLICT, "name", msg),
                    FleetError::NotDeployed { .. } => {
                        ApiError::field(StatusCode::CONFLICT, "app", msg)
                    }
                    FleetError::AppInUse { .. } => {
                        ApiError::field(StatusCode::CONFLICT, "app", msg)
                    }
                    // Both are about what else the device runs, not about
                    // the request itself.
                    FleetError::PortInUse { .. }
                    | FleetError::CpusExceedDevice { .. }
                    | FleetError::DesiredTooLarge { .. } => {
                        ApiError::field(StatusCode::CONFLICT, "app", msg)
                    }
                }
            }
            ServiceError::Store(s) => ApiError::store(s),
        }
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body and, on failure, names the field by its path
/// (`containers[0].image`) instead of axum's generic rejection text.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "request body is empty; expected a JSON object",
        ));
    }
    // serde accepts a JSON array for a struct (fields by position): every
    // body here is an object, so anything else is refused by name.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde reports a missing or unknown field at its parent's path;
        // name the field itself.
        let named = ["missing field `", "unknown field `"].iter().find_map(|p| {
            msg.split_once(p)
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(f, _)| f.to_string())
        });
        let field = match (path.as_str(), named) {
            (".", Some(f)) => f,
            (p, Some(f)) if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
            (p, Some(f)) => format!("{p}.{f}"),
            (".", None) => String::new(),
            (p, None) => p.to_string(),
        };
        let syntax = inner.is_syntax() || inner.is_eof();
        // A syntax error has no field, only a position (serde_path_to_error
        // reports the key it could not read as `?`).
        let field = if syntax { String::new() } else { field };
        let message = if syntax {
            format!("request body is not valid JSON: {msg}")
        } else if field.is_empty() {
            format!("invalid request body: {msg}")
        } else {
            format!("invalid field `{field}`: {msg}")
        };
        if field.is_empty() {
            ApiError::new(StatusCode::BAD_REQUEST, message)
        } else {
            ApiError::field(StatusCode::BAD_REQUEST, field, message)
        }
    })
}

/// `axum::extract::Query` whose rejection is the API's JSON error, naming
/// the parameter where serde does (`duplicate field `limit``).
pub(crate) struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::try_from_uri(&parts.uri) {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => {
                let text = e.body_text();
                let message = format!("invalid query string: {text}");
                Err(match text.split('`').nth(1) {
                    Some(field) => ApiError::field(StatusCode::BAD_REQUEST, field, message),
                    None => ApiError::new(StatusCode::BAD_REQUEST, message),
                })
            }
        }
    }
}

pub(crate) fn device_id(raw: &str) -> ApiResult<DeviceId> {
    DeviceId::new(raw).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "device",
            format!("invalid device id {raw:?}: {e}"),
        )
    })
}

pub(crate) fn name(field: &str, raw: &str) -> ApiResult<Name> {
    Name::new(raw).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            field,
            format!("invalid {field} name {raw:?}: {e}"),
        )
    })
}

pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(show_device))
        .route("/api/v1/devices/{id}/apps", post(deploy))
        .route(
            "/api/v1/devices/{id}/apps/{app}",
            axum::routing::delete(remove),
        )
        .route("/api/v1/devices/{id}/apps/{app}/start", post(start))
        .route("/api/v1/devices/{id}/apps/{app}/stop", post(stop))
        .route("/api/v1/devices/{id}/logs", get(logs))
        .route("/api/v1/devices/{id}/events", get(events))
        .route("/api/v1/apps", get(list_apps).post(create_app))
        .route(
            "/api/v1/apps/{name}",
            get(show_app).put(update_app).delete(delete_app),
        )
        .route("/api/v1/operations", get(list_operations))
        .route("/api/v1/operations/{id}", get(show_operation))
        .route("/api/v1/registries", get(list_registries))
        .route(
            "/api/v1/registries/{host}",
            get(show_registry).put(put_registry).delete(delete_registry),
        )
        .merge(crate::security_api::routes())
        // A route layer, so the check knows which route matched.
        .route_layer(axum::middleware::from_fn_with_state(
            service.clone(),
            crate::access::enforce,
        ))
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint; see /api/v1/devices, /api/v1/apps, /api/v1/operations, /api/v1/registries, /api/v1/enrollment-tokens, /api/v1/tokens, /api/v1/audit",
            )
        })
        .layer(axum::middleware::map_response(json_client_errors))
        .with_state(service)
}

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

/// axum's default body limit, which every JSON body here is far below.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

async fn metrics(State(s): State<Arc<Service>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics_text().await,
    )
}

async fn list_devices(State(s): State<Arc<Service>>) -> impl IntoResponse {
    Json(s.devices().await)
}

async fn show_device(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    let view = s.device(&id).await.ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "device",
            format!("device {id} is not known"),
        )
    })?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    app: Name,
}

async fn deploy(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    let body: DeployBody = parse_body(&body)?;
    let op = s.request(&id, Op::Deploy, &body.app).await?;
    Ok((
        StatusCode::ACCEPTED,
        audited(format!("app {}, operation {}", body.app, op.id)),
        Json(op),
    ))
}

async fn change(s: Arc<Service>, id: String, app: String, op: Op) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    let app = name("app", &app)?;
    let op = s.request(&id, op, &app).await?;
    Ok((
        StatusCode::ACCEPTED,
        audited(format!("operation {}", op.id)),
        Json(op),
    ))
}

async fn start(
    State(s): State<Arc<Service>>,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    change(s, id, app, Op::Start).await
}

async fn stop(
    State(s): State<Arc<Service>>,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    change(s, id, app, Op::Stop).await
}

async fn remove(
    State(s): State<Arc<Service>>,
    Path((id, app)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    change(s, id, app, Op::Remove).await
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    app: Option<String>,
    container: Option<String>,
    tail: Option<String>,
}

async fn logs(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    let app = name(
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
        Some(t) => t.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "tail",
                format!("`tail` must be a positive whole number, got {t:?}"),
            )
        })?,
    };
    let lines = s
        .logs(&id, &app, container.as_ref(), tail)
        .await
        .map_err(ServiceError::from)?;
    Ok(Json(lines))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<String>,
}

async fn events(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    let limit = parse_limit(q.limit.as_deref())?;
    Ok(Json(
        s.events(&id, limit).await.map_err(ServiceError::from)?,
    ))
}

pub(crate) fn parse_limit(raw: Option<&str>) -> ApiResult<usize> {
    match raw {
        None => Ok(100),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                ApiError::field(
                    StatusCode::BAD_REQUEST,
                    "limit",
                    format!("`limit` must be between 1 and 10000, got {l:?}"),
                )
            }),
    }
}

async fn list_apps(State(s): State<Arc<Service>>) -> impl IntoResponse {
    Json(
        s.apps()
            .await
            .into_iter()
            .map(AppView::from)
            .collect::<Vec<_>>(),
    )
}

async fn create_app(State(s): State<Arc<Service>>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let mut spec: AppSpec = parse_body(&body)?;
    spec.validate()
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field.clone(), e.to_string()))?;
    let detail = app_detail(&spec);
    let rec = s.create_app(spec).await?;
    Ok((
        StatusCode::CREATED,
        audited(detail),
        Json(AppView::from(rec)),
    ))
}

/// Replaces an app's spec. Devices pick it up when it is deployed again.
async fn update_app(
    State(s): State<Arc<Service>>,
    Path(n): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let n = name("app", &n)?;
    let mut spec: AppSpec = parse_body(&body)?;
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
    spec.validate()
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field.clone(), e.to_string()))?;
    let detail = app_detail(&spec);
    Ok((
        audited(detail),
        Json(AppView::from(s.update_app(spec).await?)),
    ))
}

/// Which privileges an app definition grants: the audit log shows who
/// decided that.
fn app_detail(spec: &AppSpec) -> String {
    let p = spec.privileges();
    if p.is_empty() {
        "unprivileged".into()
    } else {
        format!("privileges: {}", p.join(", "))
    }
}

async fn show_app(
    State(s): State<Arc<Service>>,
    Path(n): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let n = name("app", &n)?;
    let rec = s.app(&n).await.ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "app",
            format!("app {n} does not exist"),
        )
    })?;
    Ok(Json(AppView::from(rec)))
}

async fn delete_app(
    State(s): State<Arc<Service>>,
    Path(n): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let n = name("app", &n)?;
    s.delete_app(&n).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct OpsQuery {
    device: Option<String>,
    limit: Option<String>,
}

async fn list_operations(
    State(s): State<Arc<Service>>,
    ApiQuery(q): ApiQuery<OpsQuery>,
) -> ApiResult<impl IntoResponse> {
    let device = q.device.as_deref().map(device_id).transpose()?;
    let limit = parse_limit(q.limit.as_deref())?;
    Ok(Json(s.operations(device.as_ref(), limit).await))
}

async fn show_operation(
    State(s): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let op = s.operation(&id).await.ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "operation",
            format!("operation {id:?} does not exist"),
        )
    })?;
    Ok(Json(op))
}

// ----- registry credentials ---------------------------------------------------
//
// Responses show the host, the username and `password_set`, never the
// password; the request body is not echoed back in errors either.

fn registry_host(raw: &str) -> ApiResult<String> {
    registries::validate_host(raw)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field, e.to_string()))
}

async fn list_registries(State(s): State<Arc<Service>>) -> impl IntoResponse {
    Json(s.registries().await)
}

async fn show_registry(
    State(s): State<Arc<Service>>,
    Path(host): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let host = registry_host(&host)?;
    let view = s.registry(&host).await.ok_or_else(|| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "host",
            format!("no credentials stored for registry {host}"),
        )
    })?;
    Ok(Json(view))
}

async fn put_registry(
    State(s): State<Arc<Service>>,
    Path(host): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let host = registry_host(&host)?;
    // Parse errors name the field but never quote the value: it may be
    // the password.
    let body: CredentialsBody = parse_body(&body).map_err(|e| {
        let field = e.field.clone();
        let message = match &field {
            Some(f) => format!(
                "invalid field `{f}`: expected {{\"username\": string, \"password\": string}}"
            ),
            None => "invalid request body: expected {\"username\": string, \"password\": string}"
                .to_string(),
        };
        ApiError {
            status: e.status,
            message,
            field,
        }
    })?;
    registries::validate_credentials(&body)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field, e.to_string()))?;
    let detail = format!("user {}", body.username);
    let view = s
        .set_registry(drover_shared::payload::RegistryCredential {
            host,
            username: body.username,
            password: body.password,
        })
        .await?;
    Ok((audited(detail), Json(view)))
}

async fn delete_registry(
    State(s): State<Arc<Service>>,
    Path(host): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let host = registry_host(&host)?;
    if s.delete_registry(&host).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "host",
            format!("no credentials stored for registry {host}"),
        ))
    }
}
