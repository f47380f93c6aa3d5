//! Who is asking: every `/api/` request carries `Authorization: Bearer
//! <token>`; this layer turns it into an [`Actor`] for the handlers, or
//! refuses the request with 401 (and audits the refusal). What the actor
//! may do is the command path's business, not this layer's.
//!
//! It also keeps the promise that every request that tries to change
//! something is in the audit log: a change refused before it became a
//! command (a body that does not parse, a bad path) is recorded here.

use std::sync::atomic::Ordering;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiState, AuditDetail, Audited};
use crate::contract::{AuditOutcome, ErrorBody, ErrorDetail};
use crate::core::command::Actor;

/// Routes anyone may call: probes, Prometheus, the API's description, and
/// the web console's files (which hold no data).
pub fn is_public(route: &str) -> bool {
    matches!(
        route,
        "/healthz" | "/metrics" | "/api/v1/openapi.json" | "/" | "/console/{file}"
    )
}

/// The bearer token; `Some("")` for an Authorization header that is present
/// but not a readable bearer token (so it is reported as invalid, not missing).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(header::AUTHORIZATION)?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    Some(
        h.to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim()),
    )
}

fn unauthorized(message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            status: StatusCode::UNAUTHORIZED.as_u16(),
            message: message.to_string(),
            field: None,
        },
    };
    let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// The authentication layer (a route layer, so the matched route is known).
pub async fn authenticate(State(api): State<ApiState>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let action = format!("{method} {}", req.uri().path());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    if route.as_deref().is_some_and(is_public) {
        return next.run(req).await;
    }
    let access = &api.commands.access;
    let token = bearer(req.headers()).map(str::to_string);
    let Some(actor) = token.as_deref().and_then(|t| access.authenticate(t)) else {
        let presented = token.is_some();
        let message = if presented {
            "the API token is not valid (unknown, revoked or malformed)"
        } else {
            "this endpoint needs an API token: send `Authorization: Bearer <token>`"
        };
        api.commands
            .metrics
            .api_denied
            .fetch_add(1, Ordering::Relaxed);
        access
            .audit(
                &Actor::Unauthenticated {
                    presented_token: presented,
                },
                action,
                None,
                AuditOutcome::Denied,
                Some(401),
                message.to_string(),
            )
            .await;
        return unauthorized(message);
    };
    req.extensions_mut().insert(actor.clone());
    let resp = next.run(req).await;
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if mutating && resp.extensions().get::<Audited>().is_none() {
        let status = resp.status();
        let outcome = if status.is_success() {
            AuditOutcome::Ok
        } else {
            AuditOutcome::Failed
        };
        let detail = resp
            .extensions()
            .get::<AuditDetail>()
            .map(|d| d.0.clone())
            .unwrap_or_default();
        access
            .audit(&actor, action, None, outcome, Some(status.as_u16()), detail)
            .await;
    }
    resp
}
