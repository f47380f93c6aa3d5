//! The one command path. Every surface — REST today, the JSON API over
//! MQTT and rules tomorrow — turns an operator's intent into a
//! [`Command`] with its [`Actor`] and calls [`Commands::execute`]: the role
//! check and the audit record happen here, once, whatever the surface.
//! Fleet changes go to the engine; identities and tokens to `security`.

use std::sync::Arc;

use tracing::warn;

use crate::contract::{self, AuditOutcome, Role};
use crate::core::command::{Actor, Command, CommandKind};
use crate::core::fleet::FleetError;
use crate::core::platforms::{self, Target};
use crate::core::records::ImagePlatforms;
use crate::core::records::OperationRecord;
use crate::engine::{Done, EngineError, EngineHandle, FleetChange};
use crate::metrics::Metrics;
use crate::registry::Registries;
use crate::security::access::{Access, AccessError};
use crate::security::identity::{Identities, IdentityError};
use crate::store::{Store, StoreError};

/// What a command produced.
#[derive(Debug, Clone)]
pub enum Reply {
    App(contract::App),
    /// An imported app, and whether it was created (or replaced one).
    AppImported {
        app: contract::App,
        created: bool,
    },
    Operation(contract::Operation),
    Device(Box<contract::Device>),
    Assignment(Box<contract::Assignment>),
    Rollout(Box<contract::Rollout>),
    Registry(contract::Registry),
    EnrollToken(contract::EnrollToken),
    ApiToken(contract::ApiToken),
    MqttUser(contract::MqttUser),
    Revoked(contract::RevokeResponse),
    Rule(Box<contract::Rule>),
    Job(Box<contract::Job>),
    AgentRelease(contract::AgentRelease),
    Deleted,
}

/// Why a command did not run, in terms every surface can show: a field to
/// name, what was not found, what conflicts.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("{kind} needs the {needed} role; {who} has {}", has.map_or("no role".to_string(), |r| format!("the {r} role")))]
    Denied {
        kind: CommandKind,
        needed: Role,
        who: String,
        has: Option<Role>,
    },
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("{message}")]
    NotFound { field: String, message: String },
    #[error("{message}")]
    Conflict {
        field: Option<String>,
        message: String,
    },
    /// Try again later: the store is recovering, or the orchestrator is
    /// stopping. Nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// The change could not be stored. Nothing was changed.
    #[error("{0}")]
    Internal(String),
}

impl CommandError {
    /// Its HTTP status, which every surface shows (REST as the status,
    /// the JSON API over MQTT in its response's `status`).
    pub fn status(&self) -> u16 {
        match self {
            CommandError::Denied { .. } => 403,
            CommandError::Invalid { .. } => 400,
            CommandError::NotFound { .. } => 404,
            CommandError::Conflict { .. } => 409,
            CommandError::Unavailable(_) => 503,
            CommandError::Internal(_) => 500,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CommandError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        CommandError::NotFound {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A new rollout's audit detail.
fn rollout_detail(view: &contract::Rollout, what: &str, suffix: &str) -> String {
    format!(
        "rollout {} of {what}: release {} to {} device(s) matching {:?} in {} batch(es){suffix}",
        view.id,
        view.to_release,
        view.counts.total,
        view.selector,
        view.batches.len()
    )
}

fn store_failed(e: &StoreError) -> CommandError {
    tracing::error!(error = %e, "store failure");
    CommandError::Internal("the change could not be stored; nothing was changed".into())
}

impl From<EngineError> for CommandError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::Fleet(f) => match f {
                FleetError::UnknownDevice(_) => CommandError::not_found("device", msg),
                FleetError::UnknownApp(_) | FleetError::NotAssigned(_) => {
                    CommandError::not_found("app", msg)
                }
                FleetError::UnknownRelease { .. } => CommandError::not_found("release", msg),
                FleetError::AppExists(_) => CommandError::Conflict {
                    field: Some("name".into()),
                    message: msg,
                },
                // The last three are about what else the device runs, not
                // about the request itself.
                FleetError::NotDeployed { .. }
                | FleetError::NotPaused { .. }
                | FleetError::NotRunning { .. }
                | FleetError::AppInUse { .. }
                | FleetError::PortInUse { .. }
                | FleetError::CpusExceedDevice { .. }
                | FleetError::DesiredTooLarge { .. } => CommandError::Conflict {
                    field: Some("app".into()),
                    message: msg,
                },
            },
            EngineError::UnknownRegistry(_) => CommandError::not_found("host", msg),
            EngineError::UnknownRollout(_) => CommandError::not_found("id", msg),
            EngineError::RolloutInvalid { field, message } => {
                CommandError::Invalid { field, message }
            }
            EngineError::RolloutConflict { field, message } => CommandError::Conflict {
                field: Some(field),
                message,
            },
            EngineError::UnknownJob(_) => CommandError::not_found("id", msg),
            EngineError::JobInvalid { field, message } => CommandError::Invalid { field, message },
            EngineError::JobConflict { field, message } => CommandError::Conflict {
                field: Some(field),
                message,
            },
            EngineError::Store(s) => store_failed(&s),
            EngineError::Recovering | EngineError::Stopped => CommandError::Unavailable(msg),
        }
    }
}

impl From<IdentityError> for CommandError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Invalid { field, message } => CommandError::Invalid {
                message: format!("{field}: {message}"),
                field,
            },
            e @ IdentityError::Exists(_) => CommandError::Conflict {
                field: Some("name".into()),
                message: e.to_string(),
            },
            IdentityError::Store(s) => store_failed(&s),
        }
    }
}

impl From<AccessError> for CommandError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Invalid(m) => CommandError::Conflict {
                field: None,
                message: m,
            },
            e @ AccessError::NameTaken(_) => CommandError::Conflict {
                field: Some("name".into()),
                message: e.to_string(),
            },
            e @ AccessError::NameReserved(_) => CommandError::invalid("name", e.to_string()),
            AccessError::Store(s) => store_failed(&s),
            other => CommandError::Internal(other.to_string()),
        }
    }
}

/// Where a command came from, for its audit record: what the surface calls
/// the request (`POST /api/v1/apps`, `mqtt enroll`) and the surface's own
/// status for an outcome (the HTTP status for REST).
pub struct Origin {
    pub action: String,
    pub ok_status: Option<u16>,
    pub error_status: fn(&CommandError) -> Option<u16>,
}

impl Origin {
    fn status(&self, result: Result<&Reply, &CommandError>) -> Option<u16> {
        match result {
            // An import that replaced an app is a plain success, where
            // one that created it is the surface's "created".
            Ok(Reply::AppImported { created: false, .. }) => self.ok_status.map(|_| 200),
            Ok(_) => self.ok_status,
            Err(e) => (self.error_status)(e),
        }
    }
}

/// The command path. Cheap to clone.
#[derive(Clone)]
pub struct Commands {
    pub engine: EngineHandle,
    pub identities: Arc<Identities>,
    pub access: Arc<Access>,
    pub metrics: Arc<Metrics>,
    pub rules: Arc<super::rule_defs::RuleDefs>,
    /// Asked which platforms an image provides before a deploy, an
    /// assignment or a rollout reaches the engine.
    pub registries: Arc<Registries>,
    pub agent_releases: Arc<super::agent_releases::AgentReleases>,
    store: Store,
}

impl Commands {
    #[allow(clippy::too_many_arguments)] // each is a distinct collaborator
    pub fn new(
        engine: EngineHandle,
        identities: Arc<Identities>,
        access: Arc<Access>,
        metrics: Arc<Metrics>,
        rules: Arc<super::rule_defs::RuleDefs>,
        registries: Arc<Registries>,
        agent_releases: Arc<super::agent_releases::AgentReleases>,
        store: Store,
    ) -> Commands {
        Commands {
            engine,
            identities,
            access,
            metrics,
            rules,
            registries,
            agent_releases,
            store,
        }
    }

    /// Whether `actor` may run commands of `kind`; a refusal is audited.
    /// Surfaces call it before they parse a request, so a caller without
    /// the role learns nothing about what it would have done.
    pub async fn authorize(
        &self,
        actor: &Actor,
        kind: CommandKind,
        origin: &Origin,
    ) -> Result<(), CommandError> {
        if actor.may(kind) {
            return Ok(());
        }
        let who = match actor {
            Actor::ApiToken { name, .. } => format!("token {name:?}"),
            other => other.name(),
        };
        let err = CommandError::Denied {
            kind,
            needed: kind.required_role(),
            who,
            has: actor.role(),
        };
        self.metrics.api_denied.inc();
        self.access
            .audit(
                actor,
                origin.action.clone(),
                Some(kind),
                AuditOutcome::Denied,
                origin.status(Err(&err)),
                err.to_string(),
            )
            .await;
        Err(err)
    }

    /// Checks the actor's role, runs the command, and writes its audit
    /// record: who, what, how it ended, and a detail of what was done.
    pub async fn execute(
        &self,
        actor: &Actor,
        origin: &Origin,
        command: Command,
    ) -> Result<Reply, CommandError> {
        let kind = command.kind();
        self.authorize(actor, kind, origin).await?;
        let result = self.run(actor, command).await;
        let (outcome, detail) = match &result {
            Ok((_, detail)) => (AuditOutcome::Ok, detail.clone()),
            Err(e) => (AuditOutcome::Failed, e.to_string()),
        };
        let result = result.map(|(reply, _)| reply);
        self.access
            .audit(
                actor,
                origin.action.clone(),
                Some(kind),
                outcome,
                origin.status(result.as_ref()),
                detail,
            )
            .await;
        result
    }

    /// Runs a command; returns its reply and the audit detail (never a
    /// secret).
    async fn run(&self, actor: &Actor, command: Command) -> Result<(Reply, String), CommandError> {
        let by = actor.name();
        match command {
            Command::CreateApp(mut spec) => {
                validate(&mut spec)?;
                let detail = app_detail(&spec);
                let app = self.app(FleetChange::CreateApp(spec, by.clone())).await?;
                Ok((Reply::App(app), detail))
            }
            Command::UpdateApp(mut spec) => {
                validate(&mut spec)?;
                let detail = app_detail(&spec);
                let app = self.app(FleetChange::UpdateApp(spec, by.clone())).await?;
                Ok((Reply::App(app), detail))
            }
            Command::ImportApp { mut spec, replace } => {
                validate(&mut spec)?;
                let privileges = app_detail(&spec);
                match self
                    .engine
                    .change(FleetChange::ImportApp {
                        spec,
                        replace,
                        author: by.clone(),
                    })
                    .await?
                {
                    Done::App { record, created } => {
                        let detail = format!(
                            "{} from a Compose file, {privileges}",
                            if created { "created" } else { "replaced" }
                        );
                        let app = (&record).into();
                        Ok((Reply::AppImported { app, created }, detail))
                    }
                    other => Err(unexpected(other)),
                }
            }
            Command::DeleteApp(name) => {
                self.engine.change(FleetChange::DeleteApp(name)).await?;
                Ok((Reply::Deleted, String::new()))
            }
            Command::Apply { device, app, op } => {
                let unchecked = if op == drover_shared::payload::Op::Deploy {
                    self.check_platforms(Target::Deploy {
                        device: device.clone(),
                        app: app.clone(),
                    })
                    .await?
                    .0
                } else {
                    String::new()
                };
                let done = self
                    .engine
                    .change(FleetChange::Apply {
                        device,
                        app: app.clone(),
                        op,
                    })
                    .await?;
                match done {
                    Done::Operation(op) => {
                        let detail = format!("app {app}, operation {}{unchecked}", op.id);
                        Ok((Reply::Operation((&op).into()), detail))
                    }
                    other => Err(unexpected(other)),
                }
            }
            Command::SetLabels {
                device,
                set,
                remove,
                replace,
            } => {
                let device_id = device;
                crate::core::selector::validate_labels(&set)
                    .map_err(|(k, m)| CommandError::invalid(format!("labels.{k}"), m))?;
                for k in &remove {
                    crate::core::selector::validate_key(k).map_err(|m| {
                        CommandError::invalid("remove", format!("label key {k:?}: {m}"))
                    })?;
                    if set.contains_key(k) {
                        return Err(CommandError::invalid(
                            "remove",
                            format!("label {k} is both set and removed"),
                        ));
                    }
                }
                let detail = format!(
                    "{}set {:?}, removed {:?}",
                    if replace { "replaced all; " } else { "" },
                    set,
                    remove
                );
                match self
                    .engine
                    .change(FleetChange::SetLabels {
                        device: device_id.clone(),
                        set,
                        remove,
                        replace,
                    })
                    .await?
                {
                    Done::Device(view) => Ok((Reply::Device(view), detail)),
                    Done::Reconciled(_) => match self.engine.device(device_id).await? {
                        Some(view) => Ok((Reply::Device(Box::new(view)), detail)),
                        None => Err(CommandError::Internal("the device went away".into())),
                    },
                    other => Err(unexpected(other)),
                }
            }
            Command::Assign {
                app,
                selector,
                release,
                run,
            } => {
                let sel = crate::core::selector::Selector::parse(&selector).map_err(|e| {
                    CommandError::invalid(
                        "selector",
                        format!("selector {selector:?} is not valid: {e}"),
                    )
                })?;
                if run == drover_shared::model::RunState::Paused {
                    return Err(CommandError::invalid(
                        "run",
                        "an assignment runs an app (running) or keeps it stopped (stopped); pause it per device",
                    ));
                }
                let selector = sel.to_string();
                let (unchecked, platforms) = self
                    .check_platforms(Target::Selector {
                        app: app.clone(),
                        selector: selector.clone(),
                        release,
                        rollout: false,
                    })
                    .await?;
                self.engine
                    .change(FleetChange::Assign {
                        app: app.clone(),
                        selector: selector.clone(),
                        release,
                        run,
                        author: by.clone(),
                        platforms,
                    })
                    .await?;
                let view = self.assignment(app).await?;
                let detail = format!(
                    "selector {selector:?}, release {}, {} device(s) assigned{unchecked}",
                    view.release,
                    view.assigned.len()
                );
                Ok((Reply::Assignment(Box::new(view)), detail))
            }
            Command::Unassign(app) => {
                self.engine.change(FleetChange::Unassign(app)).await?;
                Ok((Reply::Deleted, String::new()))
            }
            Command::ClearOverride { device, app } => {
                self.engine
                    .change(FleetChange::ClearOverride {
                        device: device.clone(),
                        app: app.clone(),
                    })
                    .await?;
                match self.engine.device(device).await? {
                    Some(view) => Ok((Reply::Device(Box::new(view)), format!("app {app}"))),
                    None => Err(CommandError::Internal("the device went away".into())),
                }
            }
            Command::CreateRollout(request) => {
                if let Some(version) = request.agent_version.clone() {
                    if request.app.is_some() || request.release != 0 {
                        return Err(CommandError::invalid(
                            "agent_version",
                            "a rollout moves either an app (`app`, `release`) or the agent (`agent_version`), not both",
                        ));
                    }
                    let agent_binaries = self.agent_releases.list();
                    return match self
                        .engine
                        .change(FleetChange::CreateRollout {
                            request: *request,
                            author: by.clone(),
                            agent_binaries,
                            platforms: Vec::new(),
                        })
                        .await?
                    {
                        Done::Rollout(view) => {
                            let detail =
                                rollout_detail(&view, &format!("agent version {version}"), "");
                            Ok((Reply::Rollout(view), detail))
                        }
                        other => Err(unexpected(other)),
                    };
                }
                let Some(app) = request.app.clone() else {
                    return Err(CommandError::invalid(
                        "app",
                        "a rollout needs `app` (an app's release) or `agent_version`",
                    ));
                };
                let (unchecked, platforms) = self
                    .check_platforms(Target::Selector {
                        app: app.clone(),
                        selector: request.selector.clone(),
                        release: request.release,
                        rollout: true,
                    })
                    .await?;
                match self
                    .engine
                    .change(FleetChange::CreateRollout {
                        request: *request,
                        author: by.clone(),
                        platforms,
                        agent_binaries: Vec::new(),
                    })
                    .await?
                {
                    Done::Rollout(view) => {
                        let detail = rollout_detail(&view, &format!("app {app}"), &unchecked);
                        Ok((Reply::Rollout(view), detail))
                    }
                    other => Err(unexpected(other)),
                }
            }
            Command::RolloutAction { id, action } => {
                match self
                    .engine
                    .change(FleetChange::RolloutAction {
                        id: id.clone(),
                        action,
                    })
                    .await?
                {
                    Done::Rollout(view) => {
                        let detail = format!("rollout {id}: now {:?}", view.phase);
                        Ok((Reply::Rollout(view), detail))
                    }
                    other => Err(unexpected(other)),
                }
            }
            Command::CreateJob(request) => {
                match self
                    .engine
                    .change(FleetChange::CreateJob {
                        request: *request,
                        author: by.clone(),
                    })
                    .await?
                {
                    Done::Job(view) => {
                        let detail = format!(
                            "job {}: {} on {} device(s) matching {:?}, timeout {} s, concurrency {}",
                            view.id,
                            view.image,
                            view.counts.total,
                            view.selector,
                            view.timeout_secs,
                            view.concurrency
                        );
                        Ok((Reply::Job(view), detail))
                    }
                    other => Err(unexpected(other)),
                }
            }
            Command::CancelJob(id) => {
                match self
                    .engine
                    .change(FleetChange::CancelJob { id: id.clone() })
                    .await?
                {
                    Done::Job(view) => Ok((Reply::Job(view), format!("job {id} cancelled"))),
                    other => Err(unexpected(other)),
                }
            }
            Command::UploadAgentRelease { version, binary } => {
                let rec = self.agent_releases.upload(version, binary, by).await?;
                let detail = format!(
                    "agent version {} for {}, {} bytes, sha256 {}",
                    rec.version, rec.arch, rec.size, rec.digest
                );
                Ok((Reply::AgentRelease((&rec).into()), detail))
            }
            Command::DeleteAgentRelease(digest) => {
                let d = digest.clone();
                let devices = self
                    .engine
                    .read(move |f, _| f.agent_digest_users(&d))
                    .await?;
                let d = digest.clone();
                let rollouts = self.engine.agent_rollouts_using(d).await?;
                let in_use: Vec<String> = devices
                    .iter()
                    .map(|id| format!("device {id}"))
                    .chain(rollouts.iter().map(|id| format!("rollout {id}")))
                    .collect();
                self.agent_releases.delete(&digest, &in_use).await?;
                Ok((Reply::Deleted, format!("agent release {digest}")))
            }
            Command::SetRegistry(credential) => {
                crate::core::registries::validate_host(&credential.host)
                    .map_err(|e| CommandError::invalid(e.field, e.to_string()))?;
                let detail = format!("user {}", credential.username);
                match self
                    .engine
                    .change(FleetChange::SetRegistry(credential))
                    .await?
                {
                    Done::Registry(view) => Ok((Reply::Registry(view), detail)),
                    other => Err(unexpected(other)),
                }
            }
            Command::DeleteRegistry(host) => {
                self.engine
                    .change(FleetChange::DeleteRegistry(host))
                    .await?;
                Ok((Reply::Deleted, String::new()))
            }
            Command::CreateEnrollToken(req) => {
                let (rec, token) = self
                    .identities
                    .create_enroll_token(&by, req.ttl_secs, req.uses, req.device_id)
                    .await?;
                let detail = format!(
                    "enrollment token {}, {} use(s), expires at {} ms{}",
                    rec.id,
                    rec.uses_left,
                    rec.expires_at_ms,
                    rec.device
                        .as_ref()
                        .map(|d| format!(", only for device {d}"))
                        .unwrap_or_default()
                );
                let mut view = contract::EnrollToken::from(&rec);
                view.token = Some(token);
                Ok((Reply::EnrollToken(view), detail))
            }
            Command::DeleteEnrollToken(id) => {
                if self.identities.delete_enroll_token(&id).await? {
                    Ok((Reply::Deleted, String::new()))
                } else {
                    Err(CommandError::not_found(
                        "id",
                        format!("enrollment token {id:?} does not exist"),
                    ))
                }
            }
            Command::RevokeDevice(device) => {
                if !self.identities.revoke(&device).await? {
                    return Err(CommandError::not_found(
                        "device",
                        format!("device {device} has no credential to revoke"),
                    ));
                }
                let credential = self.identities.credential_state(&device);
                Ok((
                    Reply::Revoked(contract::RevokeResponse { device, credential }),
                    String::new(),
                ))
            }
            Command::CreateApiToken(req) => {
                let (rec, token) = self.access.create_token(&by, req.name, req.role).await?;
                let detail = format!(
                    "API token {} named {} with role {}",
                    rec.id, rec.name, rec.role
                );
                let mut view = contract::ApiToken::from(&rec);
                view.token = Some(token);
                Ok((Reply::ApiToken(view), detail))
            }
            Command::DeleteApiToken(id) => {
                if self.access.delete_token(&id).await? {
                    Ok((Reply::Deleted, String::new()))
                } else {
                    Err(CommandError::not_found(
                        "id",
                        format!("API token {id:?} does not exist"),
                    ))
                }
            }
            Command::CreateMqttUser(req) => {
                let (rec, password) = self
                    .identities
                    .create_automation(&by, req.name, req.role, req.subscribe, req.publish)
                    .await?;
                let detail = format!("subscribe {:?}, publish {:?}", rec.subscribe, rec.publish);
                let mut view = contract::MqttUser::from(&rec);
                view.password = Some(password);
                Ok((Reply::MqttUser(view), detail))
            }
            Command::CreateRule(rule) => {
                let detail = rule_detail(&rule);
                let rule = self.rules.put(*rule, true).await?;
                Ok((Reply::Rule(Box::new(rule)), detail))
            }
            Command::UpdateRule(rule) => {
                let detail = rule_detail(&rule);
                let rule = self.rules.put(*rule, false).await?;
                Ok((Reply::Rule(Box::new(rule)), detail))
            }
            Command::DeleteRule(name) => {
                self.rules.delete(&name).await?;
                Ok((Reply::Deleted, String::new()))
            }
            Command::DeleteMqttUser(name) => {
                if self.identities.delete_automation(name.as_str()).await? {
                    Ok((Reply::Deleted, String::new()))
                } else {
                    Err(CommandError::not_found(
                        "name",
                        format!("automation identity {name} does not exist"),
                    ))
                }
            }
        }
    }

    /// Refuses a request whose images do not provide the platform of
    /// every device it reaches (409, naming the image, the platforms it
    /// provides and the devices). Runs before the engine sees the command:
    /// the registry is asked here, never inside the engine's loop, once
    /// per image (cached per digest), not per device.
    ///
    /// What it cannot judge goes ahead, and is said in the audit detail it
    /// returns: a registry that cannot be reached, refuses the stored
    /// credentials, or does not have the image (one loaded on devices by
    /// hand must stay deployable: the device's own pull is the last word),
    /// and devices that report no platform (agents older than the report,
    /// except where their `arch` tells it).
    ///
    /// Returns that note and the platforms it read of each image: an
    /// assignment keeps them, to place devices that join it later.
    async fn check_platforms(
        &self,
        target: Target,
    ) -> Result<(String, Vec<ImagePlatforms>), CommandError> {
        let found = self
            .engine
            .read(move |fleet, secrets| {
                let t = platforms::targets(fleet, &target)?;
                let creds: Vec<_> = t
                    .images
                    .iter()
                    .map(|i| secrets.record(&i.registry_host()).map(|r| r.credential))
                    .collect();
                Some((t, creds))
            })
            .await?;
        let Some((targets, creds)) = found else {
            return Ok((String::new(), Vec::new()));
        };
        let unknown = targets.devices.iter().filter(|(_, p)| p.is_none()).count();
        let mut notes = Vec::new();
        let mut read = Vec::new();
        if unknown > 0 {
            notes.push(format!("{unknown} device(s) report no platform"));
        }
        // Asked also when no device matches yet: an assignment keeps what
        // it read for the devices that join later.
        if targets.devices.is_empty() || unknown < targets.devices.len() {
            for (image, cred) in targets.images.iter().zip(&creds) {
                match self.registries.platforms(image, cred.as_ref()).await {
                    Ok(lookup) => {
                        read.push(ImagePlatforms {
                            image: image.to_string(),
                            platforms: lookup.platforms.to_vec(),
                        });
                        platforms::judge(&image.to_string(), &lookup.platforms, &targets.devices)
                            .map_err(|m| {
                            self.metrics.platform_refused.inc();
                            CommandError::Conflict {
                                field: Some("image".into()),
                                message: m.to_string(),
                            }
                        })?;
                    }
                    Err(e) => {
                        warn!(image = %image, error = %e, "image platforms not checked; going ahead");
                        self.metrics.platform_unchecked.inc();
                        notes.push(format!("platforms of image {image} not checked: {e}"));
                    }
                }
            }
        }
        let note = if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        };
        Ok((note, read))
    }

    async fn app(&self, change: FleetChange) -> Result<contract::App, CommandError> {
        match self.engine.change(change).await? {
            Done::App { record, .. } => Ok((&record).into()),
            other => Err(unexpected(other)),
        }
    }

    /// An app's assignment with the devices it covers.
    pub async fn assignment(
        &self,
        app: drover_shared::Name,
    ) -> Result<contract::Assignment, CommandError> {
        let name = app.clone();
        self.engine
            .read(move |f, _| f.assignment_view(&name))
            .await?
            .ok_or_else(|| CommandError::not_found("app", format!("app {app} has no assignment")))
    }

    /// `Err` with the reason while the store cannot be written.
    pub fn store_health(&self) -> Result<(), String> {
        self.store.health()
    }

    /// An operation from the engine's memory, or from redb for an old
    /// finished one that was evicted from memory.
    pub async fn operation(&self, id: &str) -> Result<Option<OperationRecord>, CommandError> {
        if let Some(op) = self.engine.operation(id.to_string()).await? {
            return Ok(Some(op));
        }
        let store = self.store.clone();
        let id = id.to_string();
        match tokio::task::spawn_blocking(move || store.operation(&id)).await {
            Ok(Ok(op)) => Ok(op),
            Ok(Err(e)) => {
                warn!(error = %e, "reading an operation from the store failed");
                Err(CommandError::Internal(
                    "the operation could not be read from the store".into(),
                ))
            }
            Err(_) => Err(CommandError::Internal("store task failed".into())),
        }
    }
}

fn unexpected(done: Done) -> CommandError {
    CommandError::Internal(format!(
        "the engine answered {done:?} to a different command"
    ))
}

/// Every surface's app specs pass the same checks, here.
fn validate(spec: &mut drover_shared::model::AppSpec) -> Result<(), CommandError> {
    spec.validate()
        .map_err(|e| CommandError::invalid(e.field.clone(), e.to_string()))
}

/// What a rule does, for the audit log.
fn rule_detail(rule: &contract::Rule) -> String {
    let actions: Vec<&str> = rule.actions.iter().map(|a| a.kind()).collect();
    format!(
        "{} trigger {}, actions {}, cooldown {} s",
        if rule.enabled {
            "enabled,"
        } else {
            "disabled,"
        },
        rule.trigger.kind(),
        actions.join(", "),
        rule.cooldown_secs
    )
}

/// Which privileges an app definition grants: the audit log shows who
/// decided that.
fn app_detail(spec: &drover_shared::model::AppSpec) -> String {
    let p = spec.privileges();
    if p.is_empty() {
        "unprivileged".into()
    } else {
        format!("privileges: {}", p.join(", "))
    }
}
