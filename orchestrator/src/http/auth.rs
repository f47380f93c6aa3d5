//! Who is asking: every `/api/` request carries `Authorization: Bearer
//! <token>`, or the console's session cookie (`POST /api/v1/session`);
//! this layer turns it into an [`Actor`] for the handlers, or refuses the
//! request with 401 (and audits the refusal). What the actor may do is the
//! command path's business, not this layer's.
//!
//! A browser sends the cookie with any request to this origin, also one a
//! hostile page makes it send: a changing request authenticated by the
//! cookie must also carry the session's CSRF value in `X-Drover-CSRF`
//! (which another origin cannot read or set), and one the browser marks
//! `Sec-Fetch-Site: cross-site` is refused outright. The cookie itself is
//! `SameSite=Strict` and `HttpOnly`.
//!
//! It also keeps the promise that every request that tries to change
//! something is in the audit log: a change refused before it became a
//! command (a body that does not parse, a bad path) is recorded here.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiState, AuditDetail, Audited};
use crate::contract::{AuditOutcome, ErrorBody, ErrorDetail};
use crate::core::command::Actor;

/// The console's session cookie.
pub const SESSION_COOKIE: &str = "drover_session";
/// The header a cookie-authenticated changing request carries the
/// session's CSRF value in.
pub const CSRF_HEADER: &str = "x-drover-csrf";

/// Routes anyone may call: probes, Prometheus, the API's description, and
/// the web console's files (which hold no data).
pub fn is_public(route: &str) -> bool {
    matches!(
        route,
        "/healthz" | "/metrics" | "/api/v1/openapi.json" | "/" | "/console/{file}"
    )
}

/// The console's session: signing in (`POST`) checks the token it is
/// given itself; reading and ending the session need one.
pub const SESSION_PATH: &str = "/api/v1/session";

fn is_sign_in(route: &str, method: &Method) -> bool {
    route == SESSION_PATH && method == Method::POST
}

/// The session cookie's value, if the request has one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == SESSION_COOKIE)
        .map(|c| c.value().to_string())
}

/// How the request proved who it is.
#[derive(Clone, Debug)]
pub enum Credential {
    Bearer,
    Session(crate::core::records::SessionRecord),
}

fn forbidden(message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            status: StatusCode::FORBIDDEN.as_u16(),
            message: message.to_string(),
            field: None,
        },
    };
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
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

/// Counts and audits a request refused here.
async fn deny(api: &ApiState, who: &Actor, action: String, status: u16, message: &str) {
    api.commands.metrics.api_denied.inc();
    api.commands
        .access
        .audit(
            who,
            action,
            None,
            AuditOutcome::Denied,
            Some(status),
            message.to_string(),
        )
        .await;
}

/// The authentication layer (a route layer, so the matched route is known).
pub async fn authenticate(State(api): State<ApiState>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let action = format!("{method} {}", req.uri().path());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let access = &api.commands.access;
    let token = bearer(req.headers()).map(str::to_string);
    let cookie = session_cookie(req.headers());
    if route
        .as_deref()
        .is_some_and(|r| is_public(r) || is_sign_in(r, &method))
    {
        return next.run(req).await;
    }
    let resolved = match (&token, &cookie) {
        (Some(t), _) => access.authenticate(t).map(|a| (a, Credential::Bearer)),
        (None, Some(c)) => access.session(c).map(|(a, s)| (a, Credential::Session(s))),
        (None, None) => None,
    };
    let Some((actor, credential)) = resolved else {
        let presented = token.is_some() || cookie.is_some();
        let message = if token.is_some() {
            "the API token is not valid (unknown, revoked or malformed)"
        } else if cookie.is_some() {
            "the session has ended (expired, signed out, or its API token was revoked); sign in again"
        } else {
            "this endpoint needs an API token: send `Authorization: Bearer <token>`"
        };
        let who = Actor::Unauthenticated {
            presented_token: presented,
        };
        deny(&api, &who, action, 401, message).await;
        return unauthorized(message);
    };
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if let (true, Credential::Session(s)) = (mutating, &credential) {
        let cross_site = req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"cross-site");
        let csrf_ok = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| access.csrf_matches(s, v));
        if cross_site || !csrf_ok {
            let message = if cross_site {
                "cross-site request refused: a changing request with the session cookie must come from the console's own origin"
            } else {
                "a changing request signed in with the session cookie must send the session's CSRF value in the X-Drover-CSRF header"
            };
            deny(&api, &actor, action, 403, message).await;
            return forbidden(message);
        }
    }
    req.extensions_mut().insert(actor.clone());
    req.extensions_mut().insert(credential);
    let resp = next.run(req).await;
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
