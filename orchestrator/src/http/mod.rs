//! The REST adapter: JSON over HTTP onto the command path. A handler
//! authenticates (the `auth` layer), asks the command path whether the
//! actor may run the command's kind, parses the request into a
//! [`Command`], and executes it; the role check and the audit record are
//! the command path's (`engine::commands`), not this module's. Request and
//! response bodies are `contract` types.
//!
//! Errors are JSON objects that name the offending field:
//! `{"error": {"status": 400, "message": "...", "field": "..."}}`.

mod agent_releases;
pub mod auth;
pub mod console;
mod history;
mod jobs;
mod openapi;
mod rollouts;
mod routes;
mod rules;
pub mod security;
pub mod tls;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use drover_shared::{DeviceId, Name};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::contract::{ErrorBody, ErrorDetail};
use crate::core::command::{Actor, Command, CommandKind};
use crate::engine::commands::Origin;
use crate::engine::{CommandError, Commands, Reply};

pub use routes::{openapi, router};

/// What every handler shares.
pub struct Api {
    pub commands: Commands,
    /// Telemetry history and container logs.
    pub history: crate::history::History,
    /// Flips to `true` when the server begins to shut down: long polls and
    /// change streams end then, so the graceful drain does not wait on them.
    pub stopping: watch::Receiver<bool>,
    /// Session cookies are `Secure` (the API is served over HTTPS).
    pub secure_cookies: bool,
}

pub type ApiState = Arc<Api>;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
    /// The command path already wrote this request's audit record.
    audited: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
            audited: false,
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
            audited: false,
        }
    }
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, what)
    }
}

/// The HTTP status of a command error.
pub(crate) fn error_status(e: &CommandError) -> StatusCode {
    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let status = error_status(&e);
        let message = e.to_string();
        let field = match e {
            CommandError::Invalid { field, .. } | CommandError::NotFound { field, .. } => {
                Some(field).filter(|f| !f.is_empty())
            }
            CommandError::Conflict { field, .. } => field,
            _ => None,
        };
        ApiError {
            status,
            message,
            field,
            // Every command error comes from `authorize` or `execute`,
            // which audit it.
            audited: true,
        }
    }
}

impl From<crate::engine::EngineError> for ApiError {
    fn from(e: crate::engine::EngineError) -> Self {
        let mut err = ApiError::from(CommandError::from(e));
        err.audited = false;
        err
    }
}

/// Marks a response whose request the command path has audited.
#[derive(Debug, Clone, Copy)]
pub struct Audited;

/// Why a request failed, for the audit record the `auth` layer writes for
/// changes that never became a command (a body that does not parse).
#[derive(Debug, Clone)]
pub struct AuditDetail(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = AuditDetail(self.message.clone());
        let audited = self.audited;
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                message: self.message,
                field: self.field,
            },
        };
        let mut resp = (self.status, Extension(detail), Json(body)).into_response();
        if audited {
            resp.extensions_mut().insert(Audited);
        }
        resp
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller and what the audit log calls its request.
pub struct Ctx {
    pub actor: Actor,
    pub action: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // The `auth` layer put it there; a route outside it has no caller.
        let actor = parts.extensions.get::<Actor>().cloned().ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "this endpoint needs an API token")
        })?;
        Ok(Ctx {
            actor,
            action: format!("{} {}", parts.method, parts.uri.path()),
        })
    }
}

impl Ctx {
    /// This request as the command path's origin; `ok` is the HTTP status
    /// of success.
    pub fn origin(&self, ok: StatusCode) -> Origin {
        Origin {
            action: self.action.clone(),
            ok_status: Some(ok.as_u16()),
            error_status: |e| Some(error_status(e).as_u16()),
        }
    }

    /// May this caller run commands of `kind`? Audits a refusal.
    pub async fn authorize(&self, api: &Api, kind: CommandKind) -> ApiResult<()> {
        api.commands
            .authorize(&self.actor, kind, &self.origin(StatusCode::OK))
            .await
            .map_err(ApiError::from)
    }

    /// The REST shape of a command: check the role before anything is
    /// parsed, build the command, run it, answer `ok` with the reply.
    pub async fn run(
        &self,
        api: &Api,
        kind: CommandKind,
        ok: StatusCode,
        build: impl FnOnce() -> ApiResult<Command>,
    ) -> ApiResult<Response> {
        let origin = self.origin(ok);
        api.commands.authorize(&self.actor, kind, &origin).await?;
        let command = build()?;
        let reply = api.commands.execute(&self.actor, &origin, command).await?;
        let mut resp = match reply {
            Reply::Deleted => StatusCode::NO_CONTENT.into_response(),
            Reply::App(v) => (ok, Json(v)).into_response(),
            Reply::AppImported { app, created } => {
                let status = if created { ok } else { StatusCode::OK };
                (status, Json(app)).into_response()
            }
            Reply::Operation(v) => (ok, Json(v)).into_response(),
            Reply::Device(v) => (ok, Json(v)).into_response(),
            Reply::Assignment(v) => (ok, Json(v)).into_response(),
            Reply::Rollout(v) => (ok, Json(v)).into_response(),
            Reply::Registry(v) => (ok, Json(v)).into_response(),
            Reply::EnrollToken(v) => (ok, Json(v)).into_response(),
            Reply::ApiToken(v) => (ok, Json(v)).into_response(),
            Reply::MqttUser(v) => (ok, Json(v)).into_response(),
            Reply::Revoked(v) => (ok, Json(v)).into_response(),
            Reply::Rule(v) => (ok, Json(v)).into_response(),
            Reply::Job(v) => (ok, Json(v)).into_response(),
            Reply::AgentRelease(v) => (ok, Json(v)).into_response(),
        };
        resp.extensions_mut().insert(Audited);
        Ok(resp)
    }
}

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

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
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

/// Reads a request body of at most `limit` bytes (413 naming `what`
/// beyond it, told by `Content-Length` before anything is read).
pub(crate) async fn read_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
    what: &str,
) -> ApiResult<axum::body::Bytes> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what} is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            )
        }
    })
}
