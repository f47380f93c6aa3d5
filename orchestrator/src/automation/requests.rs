//! Commands over MQTT: an automation identity `<name>` publishes a JSON
//! request on `<root>/v1/json/req/<name>` and gets the answer on
//! `<root>/v1/json/res/<name>`, which only it may read.
//!
//! The embedded broker lets only `<name>` publish on its request topic
//! (`drover_broker::acl`), so the topic names the actor:
//! [`Actor::Automation`] with the identity's stored role. Every request
//! goes through the same command path as REST (`engine::commands`): the
//! same role check before anything is parsed, the same audit record, the
//! same reads.
//!
//! The commands are one table, [`COMMANDS`]: a name, the
//! [`CommandKind`] whose role it needs, and a handler that turns the
//! request's other fields into a [`Command`] (or a read). A new command is
//! one entry and one handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use drover_shared::codec::MAX_PAYLOAD_BYTES;
use drover_shared::payload::Op;
use drover_shared::topic::Topics;
use drover_shared::{DeviceId, Name};
use rumqttc::QoS;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::contract::{self, AuditOutcome, CreateRollout, RolloutAction};
use crate::core::command::{Actor, Command, CommandKind};
use crate::core::fleet::DeviceQuery;
use crate::core::selector::Selector;
use crate::engine::commands::Origin;
use crate::engine::{CommandError, Commands, Outbox, Reply};
use crate::link::Inbound;

/// The largest request read; anything longer is answered `too_large`
/// without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The longest request `id` echoed back.
pub const MAX_ID_CHARS: usize = 64;
/// Requests handled at once; the next waits (and the inbox buffers).
const IN_FLIGHT: usize = 32;
/// List reads answer at most this many items (`limit`), so an answer fits
/// one MQTT message.
const MAX_LIST: usize = 100;
const DEFAULT_LIST: usize = 20;

/// What a handler answers: a status (200, 201, 202) and the result.
pub struct Answer {
    pub status: u16,
    pub result: Value,
}

/// Why a request failed, as the response's `error` shows it.
#[derive(Debug)]
pub struct RequestError {
    pub status: u16,
    /// Stable, for programs: `malformed`, `too_large`, `invalid`,
    /// `unknown_command`, `forbidden`, `not_found`, `conflict`,
    /// `unavailable`, `internal`, `response_too_large`.
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Already in the audit log (the command path wrote it).
    audited: bool,
}

impl RequestError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        RequestError {
            status,
            code,
            message: message.into(),
            field: None,
            audited: false,
        }
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        RequestError {
            field: Some(field.to_string()),
            ..RequestError::new(400, "invalid", message)
        }
    }

    /// The metrics outcome.
    fn outcome(&self) -> &'static str {
        match self.code {
            "forbidden" => "refused",
            "malformed" | "too_large" | "invalid" | "unknown_command" => "invalid",
            _ => "failed",
        }
    }
}

impl From<CommandError> for RequestError {
    fn from(e: CommandError) -> Self {
        let code = match &e {
            CommandError::Denied { .. } => "forbidden",
            CommandError::Invalid { .. } => "invalid",
            CommandError::NotFound { .. } => "not_found",
            CommandError::Conflict { .. } => "conflict",
            CommandError::Unavailable(_) => "unavailable",
            CommandError::Internal(_) => "internal",
        };
        let field = match &e {
            CommandError::Invalid { field, .. } | CommandError::NotFound { field, .. } => {
                Some(field.clone()).filter(|f| !f.is_empty())
            }
            CommandError::Conflict { field, .. } => field.clone(),
            _ => None,
        };
        RequestError {
            status: e.status(),
            code,
            message: e.to_string(),
            field,
            audited: true,
        }
    }
}

impl From<crate::engine::EngineError> for RequestError {
    fn from(e: crate::engine::EngineError) -> Self {
        RequestError {
            audited: false,
            ..RequestError::from(CommandError::from(e))
        }
    }
}

/// The response document on `json/res/<name>`.
#[derive(Debug, Serialize)]
pub struct Response<'a> {
    pub id: Option<&'a str>,
    pub ok: bool,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDoc<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDoc<'a> {
    pub code: &'a str,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
}

/// One request being handled.
pub struct Ctx {
    commands: Commands,
    actor: Actor,
    origin: Origin,
}

type Args = Map<String, Value>;
type Fut<'a> = Pin<Box<dyn Future<Output = Result<Answer, RequestError>> + Send + 'a>>;
type Handler = for<'a> fn(&'a Ctx, Args) -> Fut<'a>;

/// One command of the JSON API.
pub struct Entry {
    /// `cmd` in the request.
    pub cmd: &'static str,
    /// The kind whose role it needs (and whose name the audit shows).
    pub kind: CommandKind,
    pub run: Handler,
}

/// Every command of the JSON API over MQTT (docs/protocol.md, "Commands
/// over MQTT", has an example of each).
pub const COMMANDS: &[Entry] = &[
    Entry {
        cmd: "deploy",
        kind: CommandKind::Deploy,
        run: deploy,
    },
    Entry {
        cmd: "start",
        kind: CommandKind::Start,
        run: start,
    },
    Entry {
        cmd: "stop",
        kind: CommandKind::Stop,
        run: stop,
    },
    Entry {
        cmd: "remove",
        kind: CommandKind::Remove,
        run: remove,
    },
    Entry {
        cmd: "pause",
        kind: CommandKind::Pause,
        run: pause,
    },
    Entry {
        cmd: "unpause",
        kind: CommandKind::Unpause,
        run: unpause,
    },
    Entry {
        cmd: "restart",
        kind: CommandKind::Restart,
        run: restart,
    },
    Entry {
        cmd: "label",
        kind: CommandKind::SetLabels,
        run: label,
    },
    Entry {
        cmd: "rollout.create",
        kind: CommandKind::CreateRollout,
        run: rollout_create,
    },
    Entry {
        cmd: "rollout.pause",
        kind: CommandKind::PauseRollout,
        run: rollout_pause,
    },
    Entry {
        cmd: "rollout.resume",
        kind: CommandKind::ResumeRollout,
        run: rollout_resume,
    },
    Entry {
        cmd: "rollout.approve",
        kind: CommandKind::ApproveRollout,
        run: rollout_approve,
    },
    Entry {
        cmd: "rollout.abort",
        kind: CommandKind::AbortRollout,
        run: rollout_abort,
    },
    Entry {
        cmd: "rollout.rollback",
        kind: CommandKind::RollbackRollout,
        run: rollout_rollback,
    },
    Entry {
        cmd: "jobs.create",
        kind: CommandKind::CreateJob,
        run: job_create,
    },
    Entry {
        cmd: "jobs.get",
        kind: CommandKind::ShowJob,
        run: job_get,
    },
    Entry {
        cmd: "jobs.cancel",
        kind: CommandKind::CancelJob,
        run: job_cancel,
    },
    Entry {
        cmd: "rules.list",
        kind: CommandKind::ListRules,
        run: rules_list,
    },
    Entry {
        cmd: "rule.get",
        kind: CommandKind::ShowRule,
        run: rule_get,
    },
    Entry {
        cmd: "rule.create",
        kind: CommandKind::CreateRule,
        run: rule_create,
    },
    Entry {
        cmd: "rule.update",
        kind: CommandKind::UpdateRule,
        run: rule_update,
    },
    Entry {
        cmd: "rule.delete",
        kind: CommandKind::DeleteRule,
        run: rule_delete,
    },
    Entry {
        cmd: "rule_firings.list",
        kind: CommandKind::ListRuleFirings,
        run: rule_firings_list,
    },
    Entry {
        cmd: "devices.list",
        kind: CommandKind::ListDevices,
        run: devices_list,
    },
    Entry {
        cmd: "device.get",
        kind: CommandKind::ShowDevice,
        run: device_get,
    },
    Entry {
        cmd: "apps.list",
        kind: CommandKind::ListApps,
        run: apps_list,
    },
    Entry {
        cmd: "app.get",
        kind: CommandKind::ShowApp,
        run: app_get,
    },
    Entry {
        cmd: "operations.list",
        kind: CommandKind::ListOperations,
        run: operations_list,
    },
    Entry {
        cmd: "operation.get",
        kind: CommandKind::ShowOperation,
        run: operation_get,
    },
    Entry {
        cmd: "rollouts.list",
        kind: CommandKind::ListRollouts,
        run: rollouts_list,
    },
    Entry {
        cmd: "rollout.get",
        kind: CommandKind::ShowRollout,
        run: rollout_get,
    },
];

/// Reads a request's fields (all but `id` and `cmd`) into `T`, naming the
/// field that is wrong or unknown.
fn args<T: DeserializeOwned>(a: Args) -> Result<T, RequestError> {
    serde_path_to_error::deserialize(Value::Object(a)).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        let named = ["missing field `", "unknown field `"].iter().find_map(|p| {
            msg.split_once(p)
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(f, _)| f.to_string())
        });
        let field = match (path.as_str(), named) {
            (".", Some(f)) => f,
            (p, _) => p.to_string(),
        };
        RequestError::field(&field, format!("invalid field `{field}`: {msg}"))
    })
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn reply_value(reply: &Reply) -> Value {
    match reply {
        Reply::App(v) => to_value(v),
        Reply::AppImported { app, .. } => to_value(app),
        Reply::Operation(v) => to_value(v),
        Reply::Device(v) => to_value(v),
        Reply::Assignment(v) => to_value(v),
        Reply::Rollout(v) => to_value(v),
        Reply::Rule(v) => to_value(v),
        Reply::Job(v) => to_value(v),
        Reply::Registry(v) => to_value(v),
        Reply::EnrollToken(v) => to_value(v),
        Reply::ApiToken(v) => to_value(v),
        Reply::MqttUser(v) => to_value(v),
        Reply::Revoked(v) => to_value(v),
        Reply::AgentRelease(v) => to_value(v),
        Reply::Deleted => Value::Null,
    }
}

impl Ctx {
    async fn execute(&self, command: Command, status: u16) -> Result<Answer, RequestError> {
        let origin = Origin {
            action: self.origin.action.clone(),
            ok_status: Some(status),
            error_status: self.origin.error_status,
        };
        let reply = self.commands.execute(&self.actor, &origin, command).await?;
        Ok(Answer {
            status,
            result: reply_value(&reply),
        })
    }
}

fn ok(result: Value) -> Result<Answer, RequestError> {
    Ok(Answer {
        status: 200,
        result,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceApp {
    device: DeviceId,
    app: Name,
}

async fn apply(c: &Ctx, a: Args, op: Op) -> Result<Answer, RequestError> {
    let DeviceApp { device, app } = args(a)?;
    c.execute(Command::Apply { device, app, op }, 202).await
}

fn deploy(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Deploy))
}
fn start(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Start))
}
fn stop(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Stop))
}
fn remove(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Remove))
}
fn pause(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Pause))
}
fn unpause(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Unpause))
}
fn restart(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(apply(c, a, Op::Restart))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelArgs {
    device: DeviceId,
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

fn label(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let l: LabelArgs = args(a)?;
        let command = Command::SetLabels {
            device: l.device,
            set: l.set,
            remove: l.remove,
            replace: false,
        };
        c.execute(command, 200).await
    })
}

fn rollout_create(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let r: CreateRollout = args(a)?;
        c.execute(Command::CreateRollout(Box::new(r)), 201).await
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutId {
    rollout: String,
}

async fn rollout_action(c: &Ctx, a: Args, action: RolloutAction) -> Result<Answer, RequestError> {
    let RolloutId { rollout } = args(a)?;
    c.execute(
        Command::RolloutAction {
            id: rollout,
            action,
        },
        200,
    )
    .await
}

fn rollout_pause(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(rollout_action(c, a, RolloutAction::Pause))
}
fn rollout_resume(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(rollout_action(c, a, RolloutAction::Resume))
}
fn rollout_approve(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(rollout_action(c, a, RolloutAction::Approve))
}
fn rollout_abort(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(rollout_action(c, a, RolloutAction::Abort))
}
fn rollout_rollback(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(rollout_action(c, a, RolloutAction::Rollback))
}

fn list_limit(limit: Option<usize>) -> Result<usize, RequestError> {
    match limit {
        None => Ok(DEFAULT_LIST),
        Some(n) if (1..=MAX_LIST).contains(&n) => Ok(n),
        Some(n) => Err(RequestError::field(
            "limit",
            format!("`limit` must be between 1 and {MAX_LIST}, got {n}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesArgs {
    #[serde(default)]
    selector: Option<String>,
    /// `online` or `offline`.
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

fn devices_list(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let q: DevicesArgs = args(a)?;
        let selector = q
            .selector
            .as_deref()
            .map(|s| {
                Selector::parse(s).map_err(|e| {
                    RequestError::field("selector", format!("selector {s:?} is not valid: {e}"))
                })
            })
            .transpose()?;
        let online = match q.status.as_deref() {
            None => None,
            Some("online") => Some(true),
            Some("offline") => Some(false),
            Some(other) => {
                return Err(RequestError::field(
                    "status",
                    format!("`status` must be `online` or `offline`, got {other:?}"),
                ))
            }
        };
        let page = c
            .commands
            .engine
            .device_page(DeviceQuery {
                selector,
                online,
                text: None,
                offset: q.offset,
                limit: Some(list_limit(q.limit)?),
            })
            .await?;
        ok(serde_json::json!({ "total": page.total, "devices": page.devices }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceArg {
    device: DeviceId,
}

fn device_get(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let DeviceArg { device } = args(a)?;
        match c.commands.engine.device(device.clone()).await? {
            Some(v) => ok(to_value(&v)),
            None => Err(RequestError {
                field: Some("device".into()),
                ..RequestError::new(404, "not_found", format!("device {device} is not known"))
            }),
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

fn apps_list(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let NoArgs {} = args(a)?;
        let apps = c.commands.engine.apps().await?;
        ok(to_value(
            &apps.iter().map(contract::App::from).collect::<Vec<_>>(),
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppArg {
    app: Name,
}

fn app_get(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let AppArg { app } = args(a)?;
        match c.commands.engine.app(app.clone()).await? {
            Some(r) => ok(to_value(&contract::App::from(&r))),
            None => Err(RequestError {
                field: Some("app".into()),
                ..RequestError::new(404, "not_found", format!("app {app} does not exist"))
            }),
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationsArgs {
    #[serde(default)]
    device: Option<DeviceId>,
    #[serde(default)]
    limit: Option<usize>,
}

fn operations_list(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let q: OperationsArgs = args(a)?;
        let limit = list_limit(q.limit)?;
        let ops = c.commands.engine.operations(q.device, limit).await?;
        ok(to_value(
            &ops.iter()
                .map(contract::Operation::from)
                .collect::<Vec<_>>(),
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationArg {
    operation: String,
}

fn operation_get(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let OperationArg { operation } = args(a)?;
        match c.commands.operation(&operation).await? {
            Some(op) => ok(to_value(&contract::Operation::from(&op))),
            None => Err(RequestError {
                field: Some("operation".into()),
                ..RequestError::new(
                    404,
                    "not_found",
                    format!("operation {operation:?} does not exist"),
                )
            }),
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutsArgs {
    #[serde(default)]
    app: Option<Name>,
}

fn rollouts_list(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let RolloutsArgs { app } = args(a)?;
        let rollouts = c.commands.engine.rollouts(app).await?;
        ok(to_value(&rollouts))
    })
}

fn rollout_get(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let RolloutId { rollout } = args(a)?;
        match c.commands.engine.rollout(rollout.clone()).await? {
            Some(r) => ok(to_value(&r)),
            None => Err(RequestError {
                field: Some("rollout".into()),
                ..RequestError::new(
                    404,
                    "not_found",
                    format!("rollout {rollout:?} does not exist"),
                )
            }),
        }
    })
}

fn job_create(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let j: crate::contract::CreateJob = args(a)?;
        c.execute(Command::CreateJob(Box::new(j)), 201).await
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobId {
    job: String,
}

fn job_get(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let JobId { job } = args(a)?;
        match c.commands.engine.job(job.clone()).await? {
            Some(j) => ok(to_value(&j)),
            None => Err(RequestError {
                field: Some("job".into()),
                ..RequestError::new(404, "not_found", format!("job {job:?} does not exist"))
            }),
        }
    })
}

fn job_cancel(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let JobId { job } = args(a)?;
        c.execute(Command::CancelJob(job), 200).await
    })
}

fn rules_list(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let NoArgs {} = args(a)?;
        ok(to_value(&c.commands.rules.list()))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleArg {
    rule: Name,
}

fn rule_get(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let RuleArg { rule } = args(a)?;
        match c.commands.rules.get(&rule) {
            Some(r) => ok(to_value(&r)),
            None => Err(RequestError {
                field: Some("rule".into()),
                ..RequestError::new(404, "not_found", format!("rule {rule} does not exist"))
            }),
        }
    })
}

/// The rule's fields are the request's (as the REST body of
/// `POST /api/v1/rules`).
fn rule_create(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let r: contract::Rule = args(a)?;
        c.execute(Command::CreateRule(Box::new(r)), 201).await
    })
}

fn rule_update(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let r: contract::Rule = args(a)?;
        c.execute(Command::UpdateRule(Box::new(r)), 200).await
    })
}

fn rule_delete(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let RuleArg { rule } = args(a)?;
        c.execute(Command::DeleteRule(rule), 204).await
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FiringsArgs {
    #[serde(default)]
    rule: Option<Name>,
    #[serde(default)]
    device: Option<DeviceId>,
    #[serde(default)]
    limit: Option<u16>,
}

/// Newest first; at most 100 in one answer (a message has to hold them).
fn rule_firings_list(c: &Ctx, a: Args) -> Fut<'_> {
    Box::pin(async move {
        let f: FiringsArgs = args(a)?;
        let limit = usize::from(f.limit.unwrap_or(20));
        if !(1..=100).contains(&limit) {
            return Err(RequestError::field(
                "limit",
                "limit must be between 1 and 100",
            ));
        }
        ok(to_value(
            &c.commands.rules.firings(f.rule, f.device, limit).await?,
        ))
    })
}

/// A request split into its id, its command and the rest; or the error
/// to answer (with the id when it could be read).
struct Parsed {
    id: Option<String>,
    cmd: String,
    args: Args,
}

fn parse(payload: &[u8]) -> Result<Parsed, (Option<String>, RequestError)> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err((
            None,
            RequestError::new(
                413,
                "too_large",
                format!(
                    "request is {} bytes; at most {MAX_REQUEST_BYTES} are read",
                    payload.len()
                ),
            ),
        ));
    }
    let mut obj = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return Err((
                None,
                RequestError::new(400, "malformed", "a request is a JSON object"),
            ))
        }
        Err(e) => {
            return Err((
                None,
                RequestError::new(400, "malformed", format!("request is not valid JSON: {e}")),
            ))
        }
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_ID_CHARS => Some(s),
        Some(_) => {
            return Err((
                None,
                RequestError::field(
                    "id",
                    format!("`id` is a string of at most {MAX_ID_CHARS} characters"),
                ),
            ))
        }
    };
    let cmd = match obj.remove("cmd") {
        Some(Value::String(s)) => s,
        None => {
            return Err((
                id,
                RequestError::field("cmd", "missing field `cmd`: the command to run"),
            ))
        }
        Some(_) => return Err((id, RequestError::field("cmd", "`cmd` is a string"))),
    };
    Ok(Parsed { id, cmd, args: obj })
}

/// The request service: reads requests from the link's inbox, answers each
/// on the identity's response topic.
#[derive(Clone)]
pub struct Requests {
    pub commands: Commands,
    pub topics: Topics,
    pub outbox: Outbox,
}

impl Requests {
    /// Runs until `stopping` flips or the inbox closes. Requests are
    /// handled concurrently, at most [`IN_FLIGHT`] at once.
    pub async fn run(
        self,
        mut inbox: broadcast::Receiver<Arc<Inbound>>,
        mut stopping: watch::Receiver<bool>,
    ) {
        let mut running = JoinSet::new();
        loop {
            while running.len() >= IN_FLIGHT {
                running.join_next().await;
            }
            let msg = tokio::select! {
                _ = super::stopped(&mut stopping) => break,
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                msg = inbox.recv() => msg,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(
                        missed = n,
                        "JSON requests lost: the inbox overflowed; their senders get no answer"
                    );
                    for _ in 0..n {
                        self.commands.metrics.mqtt_request("failed");
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let Some(name) = self.topics.parse_json_request(&msg.topic) else {
                continue;
            };
            let name = name.to_string();
            let this = self.clone();
            running.spawn(async move { this.answer(&name, &msg.payload).await });
        }
        // Answers already being worked on are finished: their commands
        // may have run, and the caller should hear so.
        while running.join_next().await.is_some() {}
    }

    /// Handles one request from identity `name` and publishes the answer.
    pub async fn answer(&self, name: &str, payload: &[u8]) {
        let Some(role) = self.commands.identities.automation_role(name) else {
            // Deleted after it published; nobody is left to answer.
            debug!(%name, "request from an identity that no longer exists; ignored");
            return;
        };
        let actor = Actor::Automation {
            name: name.to_string(),
            role,
        };
        let (id, result) = self.handle(&actor, payload).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.commands.metrics.mqtt_request(outcome);
        let body = render(id.as_deref(), &result);
        let topic = self.topics.json_response(name);
        if !self
            .outbox
            .publish_raw(topic, body, QoS::AtLeastOnce, false)
        {
            warn!(%name, "answer to a JSON request not queued (outbox full)");
        }
    }

    async fn handle(
        &self,
        actor: &Actor,
        payload: &[u8],
    ) -> (Option<String>, Result<Answer, RequestError>) {
        let parsed = match parse(payload) {
            Ok(p) => p,
            Err((id, e)) => {
                self.audit_unrun(actor, "mqtt request", None, &e).await;
                return (id, Err(e));
            }
        };
        let action = format!("mqtt {}", truncate(&parsed.cmd, 64));
        let Some(entry) = COMMANDS.iter().find(|e| e.cmd == parsed.cmd) else {
            let e = RequestError::field(
                "cmd",
                format!(
                    "unknown command {:?}; known: {}",
                    truncate(&parsed.cmd, 64),
                    COMMANDS
                        .iter()
                        .map(|e| e.cmd)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            let e = RequestError {
                code: "unknown_command",
                ..e
            };
            self.audit_unrun(actor, &action, None, &e).await;
            return (parsed.id, Err(e));
        };
        let ctx = Ctx {
            commands: self.commands.clone(),
            actor: actor.clone(),
            origin: Origin {
                action,
                ok_status: Some(200),
                error_status: |e| Some(e.status()),
            },
        };
        // The role first, before anything is parsed: like REST, a caller
        // without it learns nothing about what it would have done.
        if let Err(e) = ctx.commands.authorize(actor, entry.kind, &ctx.origin).await {
            return (parsed.id, Err(e.into()));
        }
        let result = (entry.run)(&ctx, parsed.args).await;
        if let Err(e) = &result {
            if entry.kind.is_change() {
                self.audit_unrun(actor, &ctx.origin.action, Some(entry.kind), e)
                    .await;
            }
        }
        (parsed.id, result)
    }

    /// Audits a request that failed before the command path saw it (like
    /// a REST change whose body does not parse). Reads that succeed are
    /// not audited, as over REST.
    async fn audit_unrun(
        &self,
        actor: &Actor,
        action: &str,
        kind: Option<CommandKind>,
        e: &RequestError,
    ) {
        if e.audited {
            return;
        }
        self.commands
            .access
            .audit(
                actor,
                action.to_string(),
                kind,
                AuditOutcome::Failed,
                Some(e.status),
                e.message.clone(),
            )
            .await;
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The response document's bytes. One that would not fit an MQTT message
/// becomes an error saying so.
pub fn render(id: Option<&str>, result: &Result<Answer, RequestError>) -> Vec<u8> {
    let doc = match result {
        Ok(a) => Response {
            id,
            ok: true,
            status: a.status,
            result: Some(&a.result),
            error: None,
        },
        Err(e) => Response {
            id,
            ok: false,
            status: e.status,
            result: None,
            error: Some(ErrorDoc {
                code: e.code,
                message: &e.message,
                field: e.field.as_deref(),
            }),
        },
    };
    let body = serde_json::to_vec(&doc).unwrap_or_default();
    if body.len() <= MAX_PAYLOAD_BYTES - 1024 {
        return body;
    }
    let e = RequestError::new(
        413,
        "response_too_large",
        format!(
            "the answer is {} bytes, more than one MQTT message carries; ask for fewer (`limit`)",
            body.len()
        ),
    );
    render(id, &Err(e))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn err(payload: &[u8]) -> (Option<String>, RequestError) {
        match parse(payload) {
            Ok(_) => panic!("parsed {:?}", String::from_utf8_lossy(payload)),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_requests_are_named() {
        let (id, e) = err(b"{not json");
        assert_eq!((id, e.code, e.status), (None, "malformed", 400));
        let (_, e) = err(b"[1,2]");
        assert_eq!(e.code, "malformed");
        let (_, e) = err(&vec![b' '; MAX_REQUEST_BYTES + 1]);
        assert_eq!((e.code, e.status), ("too_large", 413));
        let (id, e) = err(br#"{"id": 5, "cmd": "deploy"}"#);
        assert_eq!((id, e.field.as_deref()), (None, Some("id")));
        let long = format!(r#"{{"id": "{}", "cmd": "x"}}"#, "a".repeat(65));
        assert_eq!(err(long.as_bytes()).1.field.as_deref(), Some("id"));
        let (id, e) = err(br#"{"id": "r1"}"#);
        assert_eq!(
            (id.as_deref(), e.field.as_deref()),
            (Some("r1"), Some("cmd"))
        );
        let (_, e) = err(br#"{"id": "r1", "cmd": 3}"#);
        assert_eq!(e.field.as_deref(), Some("cmd"));
        let p = parse(br#"{"id": "r1", "cmd": "deploy", "device": "pi"}"#).expect("ok");
        assert_eq!((p.id.as_deref(), p.cmd.as_str()), (Some("r1"), "deploy"));
        assert_eq!(p.args.len(), 1);
    }

    #[test]
    fn arguments_name_the_wrong_field() {
        let a = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        let e = args::<DeviceApp>(a(json!({"device": "pi"})))
            .err()
            .expect("missing");
        assert_eq!(e.field.as_deref(), Some("app"));
        let e = args::<DeviceApp>(a(json!({"device": "pi", "app": "w", "x": 1})))
            .err()
            .expect("unknown");
        assert_eq!(e.field.as_deref(), Some("x"));
        let e = args::<DeviceApp>(a(json!({"device": "p i", "app": "w"})))
            .err()
            .expect("bad id");
        assert_eq!(e.field.as_deref(), Some("device"));
        let e = args::<DeviceApp>(a(json!({"device": 1, "app": "w"})))
            .err()
            .expect("wrong type");
        assert_eq!(e.field.as_deref(), Some("device"));
    }

    #[test]
    fn the_table_names_each_command_once_and_matches_its_kind() {
        let mut seen = std::collections::HashSet::new();
        for e in COMMANDS {
            assert!(seen.insert(e.cmd), "{} twice", e.cmd);
        }
        for (cmd, kind) in [
            ("deploy", CommandKind::Deploy),
            ("stop", CommandKind::Stop),
            ("restart", CommandKind::Restart),
            ("rule.create", CommandKind::CreateRule),
            ("rule_firings.list", CommandKind::ListRuleFirings),
            ("rollout.abort", CommandKind::AbortRollout),
            ("devices.list", CommandKind::ListDevices),
            ("jobs.create", CommandKind::CreateJob),
            ("jobs.get", CommandKind::ShowJob),
            ("jobs.cancel", CommandKind::CancelJob),
        ] {
            let e = COMMANDS.iter().find(|e| e.cmd == cmd).expect("listed");
            assert_eq!(e.kind, kind);
        }
    }

    #[test]
    fn responses_echo_the_id_and_carry_result_or_error() {
        let ok = render(
            Some("r1"),
            &Ok(Answer {
                status: 202,
                result: json!({"id": "op"}),
            }),
        );
        let v: Value = serde_json::from_slice(&ok).expect("json");
        assert_eq!(
            v,
            json!({"id": "r1", "ok": true, "status": 202, "result": {"id": "op"}})
        );
        let e = render(None, &Err(RequestError::field("app", "bad")));
        let v: Value = serde_json::from_slice(&e).expect("json");
        assert_eq!(
            v,
            json!({"id": null, "ok": false, "status": 400, "error": {"code": "invalid", "message": "bad", "field": "app"}})
        );
        let huge = render(
            Some("r2"),
            &Ok(Answer {
                status: 200,
                result: json!("x".repeat(MAX_PAYLOAD_BYTES)),
            }),
        );
        let v: Value = serde_json::from_slice(&huge).expect("json");
        assert_eq!(v["error"]["code"], "response_too_large");
        assert_eq!(v["id"], "r2");
    }
}
