//! REST endpoints for rules (`contract::rules`): define them, read them,
//! read what they did. Firings also stream on `GET /api/v1/changes`
//! (kind `rule_firing`) and on MQTT (`<root>/v1/json/fleet/rules`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{
    device_id, name, parse_body, parse_limit, ApiError, ApiQuery, ApiResult, ApiState, Ctx,
};
use crate::contract::{self, ErrorBody};
use crate::core::command::{Command, CommandKind};
use crate::engine::rule_defs::no_rule;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_rules, create_rule))
        .routes(routes!(show_rule, update_rule, delete_rule))
        .routes(routes!(rule_firings))
        .routes(routes!(all_firings))
}

/// Every rule, by name.
#[utoipa::path(get, path = "/api/v1/rules", tag = "rules",
    responses((status = 200, description = "The rules", body = Vec<contract::Rule>)))]
async fn list_rules(State(api): State<ApiState>, ctx: Ctx) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ListRules).await?;
    Ok(Json(api.commands.rules.list()))
}

/// Creates a rule. The condition (CEL), selector, topics and URLs are
/// checked now: a 400 names the field and what is wrong.
#[utoipa::path(post, path = "/api/v1/rules", tag = "rules",
    request_body = contract::Rule,
    responses(
        (status = 201, description = "The rule, in force at once", body = contract::Rule),
        (status = 400, description = "The rule is not valid; `field` names what", body = ErrorBody),
        (status = 409, description = "A rule of that name exists", body = ErrorBody),
    ))]
async fn create_rule(State(api): State<ApiState>, ctx: Ctx, body: Bytes) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::CreateRule, StatusCode::CREATED, || {
        let rule: contract::Rule = parse_body(&body)?;
        Ok(Command::CreateRule(Box::new(rule)))
    })
    .await
}

/// One rule.
#[utoipa::path(get, path = "/api/v1/rules/{name}", tag = "rules",
    params(("name" = String, Path, description = "The rule's name")),
    responses(
        (status = 200, description = "The rule", body = contract::Rule),
        (status = 400, description = "The name is not a valid rule name", body = ErrorBody),
        (status = 404, description = "No such rule", body = ErrorBody),
    ))]
async fn show_rule(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(raw): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ctx.authorize(&api, CommandKind::ShowRule).await?;
    let rule = rule_name(&raw)?;
    match api.commands.rules.get(&rule) {
        Some(r) => Ok(Json(r)),
        None => Err(no_rule(&rule).into()),
    }
}

/// Replaces a rule (its timers and cooldowns start again). The body's
/// `name` must be the path's.
#[utoipa::path(put, path = "/api/v1/rules/{name}", tag = "rules",
    params(("name" = String, Path, description = "The rule's name")),
    request_body = contract::Rule,
    responses(
        (status = 200, description = "The rule as it is now", body = contract::Rule),
        (status = 400, description = "The rule is not valid; `field` names what", body = ErrorBody),
        (status = 404, description = "No such rule", body = ErrorBody),
    ))]
async fn update_rule(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(raw): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    ctx.run(&api, CommandKind::UpdateRule, StatusCode::OK, || {
        let path = rule_name(&raw)?;
        let rule: contract::Rule = parse_body(&body)?;
        if rule.name != path {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                "name",
                format!("the body names rule {}, the path {path}", rule.name),
            ));
        }
        Ok(Command::UpdateRule(Box::new(rule)))
    })
    .await
}

/// Deletes a rule; its firings stay until newer ones push them out.
#[utoipa::path(delete, path = "/api/v1/rules/{name}", tag = "rules",
    params(("name" = String, Path, description = "The rule's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The name is not a valid rule name", body = ErrorBody),
        (status = 404, description = "No such rule", body = ErrorBody),
    ))]
async fn delete_rule(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(raw): Path<String>,
) -> ApiResult<Response> {
    ctx.run(
        &api,
        CommandKind::DeleteRule,
        StatusCode::NO_CONTENT,
        || Ok(Command::DeleteRule(name("name", &raw)?)),
    )
    .await
}

/// Any text in the path is looked up: one that cannot be a rule's name
/// names no rule (404), like a well-formed name that names none.
fn rule_name(raw: &str) -> ApiResult<drover_shared::Name> {
    drover_shared::Name::new(raw).map_err(|_| {
        ApiError::field(
            StatusCode::NOT_FOUND,
            "name",
            format!("rule {raw:?} does not exist"),
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FiringsQuery {
    device: Option<String>,
    rule: Option<String>,
    limit: Option<String>,
}

/// A rule's firings, newest first.
#[utoipa::path(get, path = "/api/v1/rules/{name}/firings", tag = "rules",
    params(
        ("name" = String, Path, description = "The rule's name"),
        ("device" = Option<String>, Query, description = "Only this device's firings"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (default 100)"),
    ),
    responses(
        (status = 200, description = "Firings, newest first", body = Vec<contract::RuleFiring>),
        (status = 400, description = "A parameter is not valid; `field` names it", body = ErrorBody),
    ))]
async fn rule_firings(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(raw): Path<String>,
    ApiQuery(mut q): ApiQuery<FiringsQuery>,
) -> ApiResult<impl IntoResponse> {
    q.rule = Some(raw);
    firings(&api, &ctx, q).await
}

/// Every rule's firings, newest first (the last 10,000 are kept).
#[utoipa::path(get, path = "/api/v1/rule-firings", tag = "rules",
    params(
        ("device" = Option<String>, Query, description = "Only this device's firings"),
        ("rule" = Option<String>, Query, description = "Only this rule's firings"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (default 100)"),
    ),
    responses(
        (status = 200, description = "Firings, newest first", body = Vec<contract::RuleFiring>),
        (status = 400, description = "A parameter is not valid; `field` names it", body = ErrorBody),
    ))]
async fn all_firings(
    State(api): State<ApiState>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<FiringsQuery>,
) -> ApiResult<impl IntoResponse> {
    firings(&api, &ctx, q).await
}

async fn firings(
    api: &ApiState,
    ctx: &Ctx,
    q: FiringsQuery,
) -> ApiResult<Json<Vec<contract::RuleFiring>>> {
    ctx.authorize(api, CommandKind::ListRuleFirings).await?;
    let rule = q.rule.as_deref().map(|r| name("rule", r)).transpose()?;
    let device = q.device.as_deref().map(device_id).transpose()?;
    let limit = parse_limit(q.limit.as_deref())?;
    Ok(Json(api.commands.rules.firings(rule, device, limit).await?))
}
