//! Commands: every operator intent as a typed value with the actor behind
//! it. Whatever surface a command arrives through — REST, the CLI through
//! REST, the JSON API over MQTT, a rule — the role it needs and the audit
//! record it leaves are properties of the command ([`CommandKind`]), checked
//! and written in one place (`engine::commands`). Pure: no I/O.

use std::collections::BTreeMap;

use drover_shared::model::{AppSpec, RunState};
use drover_shared::payload::{Op, RegistryCredential};
use drover_shared::{DeviceId, Name};

use crate::contract::{
    CreateRollout, NewApiToken, NewEnrollToken, NewMqttUser, Role, RolloutAction, Rule,
};

/// What the audit log calls requests without a valid token; no token may
/// be named so, or its actions would read as a stranger's.
pub const ANONYMOUS_ACTOR: &str = "anonymous";
pub const INVALID_TOKEN_ACTOR: &str = "invalid-token";

/// Who asks. The audit log's "who" is [`Actor::name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A REST API token, by its (unique) name and role.
    ApiToken { name: String, role: Role },
    /// An automation identity's JSON request over MQTT
    /// (`<root>/v1/json/req/<name>`), with the identity's role. Audited as
    /// `auto:<name>`.
    Automation { name: String, role: Role },
    /// A device speaking for itself (enrollment).
    Device(DeviceId),
    /// The orchestrator itself (bootstrap, housekeeping). Never comes from
    /// outside.
    System,
    /// A rule acting on its own, with the operator role (`rule:<name>`).
    Rule { name: String },
    /// A request without a valid credential: refused, and audited as
    /// `anonymous` (no token) or `invalid-token`.
    Unauthenticated { presented_token: bool },
}

impl Actor {
    pub fn name(&self) -> String {
        match self {
            Actor::ApiToken { name, .. } => name.clone(),
            Actor::Automation { name, .. } => format!("auto:{name}"),
            Actor::Device(id) => format!("device:{id}"),
            Actor::System => "system".into(),
            Actor::Rule { name } => format!("rule:{name}"),
            Actor::Unauthenticated {
                presented_token: false,
            } => ANONYMOUS_ACTOR.into(),
            Actor::Unauthenticated {
                presented_token: true,
            } => INVALID_TOKEN_ACTOR.into(),
        }
    }

    /// The role the actor holds; `None` for actors that hold no role and
    /// may run no operator command.
    pub fn role(&self) -> Option<Role> {
        match self {
            Actor::ApiToken { role, .. } | Actor::Automation { role, .. } => Some(*role),
            Actor::Device(_) | Actor::Unauthenticated { .. } => None,
            Actor::System => Some(Role::Admin),
            Actor::Rule { .. } => Some(Role::Operator),
        }
    }

    /// Whether the actor may run commands of `kind`.
    pub fn may(&self, kind: CommandKind) -> bool {
        self.role().is_some_and(|r| r >= kind.required_role())
    }
}

/// A change an operator asks for, with everything it needs.
#[derive(Debug, Clone)]
pub enum Command {
    CreateApp(AppSpec),
    UpdateApp(AppSpec),
    /// An app from a Compose file (`core::compose`): created, or with
    /// `replace` also replacing an existing app of that name.
    ImportApp {
        spec: AppSpec,
        replace: bool,
    },
    DeleteApp(Name),
    /// Deploy, start, stop or remove one app on one device.
    Apply {
        device: DeviceId,
        app: Name,
        op: Op,
    },
    /// Change a device's operator-set labels: `replace` drops the others
    /// first (PUT), otherwise `set` and `remove` apply to what is there.
    SetLabels {
        device: DeviceId,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        replace: bool,
    },
    /// Put an app at a release on every device matching a selector.
    Assign {
        app: Name,
        selector: String,
        release: u64,
        run: RunState,
    },
    /// Delete an app's assignment, removing the app where it put it.
    Unassign(Name),
    /// Let an app's assignment manage a device again after a deploy or
    /// removal by hand.
    ClearOverride {
        device: DeviceId,
        app: Name,
    },
    SetRegistry(RegistryCredential),
    DeleteRegistry(String),
    /// Roll a release out to the devices a selector matches, in batches.
    CreateRollout(Box<CreateRollout>),
    /// Pause, resume, approve, abort or roll back a rollout.
    RolloutAction {
        id: String,
        action: RolloutAction,
    },
    CreateEnrollToken(NewEnrollToken),
    DeleteEnrollToken(String),
    RevokeDevice(DeviceId),
    CreateApiToken(NewApiToken),
    DeleteApiToken(String),
    CreateMqttUser(NewMqttUser),
    DeleteMqttUser(Name),
    /// Run a container to completion on the devices a selector matches.
    CreateJob(Box<crate::contract::CreateJob>),
    CancelJob(String),
    CreateRule(Box<Rule>),
    /// Replaces a rule of the same name.
    UpdateRule(Box<Rule>),
    DeleteRule(Name),
    /// Store an agent binary under a version (checked as it is stored).
    UploadAgentRelease {
        version: String,
        binary: bytes::Bytes,
    },
    /// By digest.
    DeleteAgentRelease(String),
}

impl Command {
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::CreateApp(_) => CommandKind::CreateApp,
            Command::UpdateApp(_) => CommandKind::UpdateApp,
            Command::ImportApp { .. } => CommandKind::ImportApp,
            Command::DeleteApp(_) => CommandKind::DeleteApp,
            Command::Apply { op, .. } => CommandKind::of_op(*op),
            Command::SetLabels { .. } => CommandKind::SetLabels,
            Command::Assign { .. } => CommandKind::Assign,
            Command::Unassign(_) => CommandKind::Unassign,
            Command::ClearOverride { .. } => CommandKind::ClearOverride,
            Command::SetRegistry(_) => CommandKind::SetRegistry,
            Command::DeleteRegistry(_) => CommandKind::DeleteRegistry,
            Command::CreateRollout(_) => CommandKind::CreateRollout,
            Command::RolloutAction { action, .. } => CommandKind::of_rollout_action(*action),
            Command::CreateEnrollToken(_) => CommandKind::CreateEnrollToken,
            Command::DeleteEnrollToken(_) => CommandKind::DeleteEnrollToken,
            Command::RevokeDevice(_) => CommandKind::RevokeDevice,
            Command::CreateApiToken(_) => CommandKind::CreateApiToken,
            Command::DeleteApiToken(_) => CommandKind::DeleteApiToken,
            Command::CreateMqttUser(_) => CommandKind::CreateMqttUser,
            Command::DeleteMqttUser(_) => CommandKind::DeleteMqttUser,
            Command::CreateJob(_) => CommandKind::CreateJob,
            Command::CancelJob(_) => CommandKind::CancelJob,
            Command::CreateRule(_) => CommandKind::CreateRule,
            Command::UpdateRule(_) => CommandKind::UpdateRule,
            Command::DeleteRule(_) => CommandKind::DeleteRule,
            Command::UploadAgentRelease { .. } => CommandKind::UploadAgentRelease,
            Command::DeleteAgentRelease(_) => CommandKind::DeleteAgentRelease,
        }
    }
}

/// Every kind of request, changes and reads alike: each needs a role; each
/// change leaves an audit record under [`CommandKind::name`], and so does
/// every refused request of any kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    // changes
    CreateApp,
    UpdateApp,
    ImportApp,
    DeleteApp,
    Deploy,
    Start,
    Stop,
    Remove,
    Pause,
    Unpause,
    Restart,
    SetLabels,
    Assign,
    Unassign,
    ClearOverride,
    SetRegistry,
    DeleteRegistry,
    CreateRollout,
    PauseRollout,
    ResumeRollout,
    ApproveRollout,
    AbortRollout,
    RollbackRollout,
    CreateEnrollToken,
    DeleteEnrollToken,
    RevokeDevice,
    CreateApiToken,
    DeleteApiToken,
    CreateMqttUser,
    DeleteMqttUser,
    CreateRule,
    UpdateRule,
    DeleteRule,
    CreateJob,
    CancelJob,
    UploadAgentRelease,
    DeleteAgentRelease,
    // reads
    ListDevices,
    ShowDevice,
    ListApps,
    ShowApp,
    ListOperations,
    ShowOperation,
    ReadLogs,
    ReadEvents,
    WatchChanges,
    ListRegistries,
    ShowRegistry,
    ListRollouts,
    ShowRollout,
    ListEnrollTokens,
    ListApiTokens,
    ListMqttUsers,
    ReadAudit,
    ListRules,
    ShowRule,
    ListRuleFirings,
    ListJobs,
    ShowJob,
    ListAgentReleases,
}

impl CommandKind {
    pub const ALL: [CommandKind; 60] = [
        CommandKind::CreateApp,
        CommandKind::UpdateApp,
        CommandKind::ImportApp,
        CommandKind::DeleteApp,
        CommandKind::Deploy,
        CommandKind::Start,
        CommandKind::Stop,
        CommandKind::Remove,
        CommandKind::Pause,
        CommandKind::Unpause,
        CommandKind::Restart,
        CommandKind::SetLabels,
        CommandKind::Assign,
        CommandKind::Unassign,
        CommandKind::ClearOverride,
        CommandKind::SetRegistry,
        CommandKind::DeleteRegistry,
        CommandKind::CreateRollout,
        CommandKind::PauseRollout,
        CommandKind::ResumeRollout,
        CommandKind::ApproveRollout,
        CommandKind::AbortRollout,
        CommandKind::RollbackRollout,
        CommandKind::CreateEnrollToken,
        CommandKind::DeleteEnrollToken,
        CommandKind::RevokeDevice,
        CommandKind::CreateApiToken,
        CommandKind::DeleteApiToken,
        CommandKind::CreateMqttUser,
        CommandKind::DeleteMqttUser,
        CommandKind::ListDevices,
        CommandKind::ShowDevice,
        CommandKind::ListApps,
        CommandKind::ShowApp,
        CommandKind::ListOperations,
        CommandKind::ShowOperation,
        CommandKind::ReadLogs,
        CommandKind::ReadEvents,
        CommandKind::WatchChanges,
        CommandKind::ListRegistries,
        CommandKind::ShowRegistry,
        CommandKind::ListRollouts,
        CommandKind::ShowRollout,
        CommandKind::ListEnrollTokens,
        CommandKind::ListApiTokens,
        CommandKind::ListMqttUsers,
        CommandKind::ReadAudit,
        CommandKind::CreateRule,
        CommandKind::UpdateRule,
        CommandKind::DeleteRule,
        CommandKind::ListRules,
        CommandKind::ShowRule,
        CommandKind::ListRuleFirings,
        CommandKind::CreateJob,
        CommandKind::CancelJob,
        CommandKind::ListJobs,
        CommandKind::ShowJob,
        CommandKind::UploadAgentRelease,
        CommandKind::DeleteAgentRelease,
        CommandKind::ListAgentReleases,
    ];

    /// The kind of an [`Command::Apply`] with this op.
    pub fn of_op(op: Op) -> CommandKind {
        match op {
            Op::Deploy => CommandKind::Deploy,
            Op::Start => CommandKind::Start,
            Op::Stop => CommandKind::Stop,
            Op::Remove => CommandKind::Remove,
            Op::Pause => CommandKind::Pause,
            Op::Unpause => CommandKind::Unpause,
            Op::Restart => CommandKind::Restart,
        }
    }

    /// The kind of a [`Command::RolloutAction`] with this action.
    pub fn of_rollout_action(action: RolloutAction) -> CommandKind {
        match action {
            RolloutAction::Pause => CommandKind::PauseRollout,
            RolloutAction::Resume => CommandKind::ResumeRollout,
            RolloutAction::Approve => CommandKind::ApproveRollout,
            RolloutAction::Abort => CommandKind::AbortRollout,
            RolloutAction::Rollback => CommandKind::RollbackRollout,
        }
    }

    /// The least role that may run it. Viewers read; operators also deploy,
    /// start, stop, remove and enroll; admins define apps (and so decide
    /// which apps get privileges), revoke devices, and manage tokens,
    /// identities, registries and the audit log.
    pub fn required_role(self) -> Role {
        use CommandKind::*;
        match self {
            Deploy | Start | Stop | Remove | Pause | Unpause | Restart | SetLabels | Assign
            | Unassign | ClearOverride | CreateRollout | PauseRollout | ResumeRollout
            | ApproveRollout | AbortRollout | RollbackRollout | CreateEnrollToken
            | DeleteEnrollToken | ListEnrollTokens | CreateRule | UpdateRule | DeleteRule
            | CreateJob | CancelJob => Role::Operator,
            CreateApp | UpdateApp | ImportApp | DeleteApp | SetRegistry | DeleteRegistry
            | RevokeDevice | CreateApiToken | DeleteApiToken | CreateMqttUser | DeleteMqttUser
            | ListApiTokens | ListMqttUsers | ReadAudit
            // An agent binary runs as the agent's user on every device.
            | UploadAgentRelease | DeleteAgentRelease => Role::Admin,
            ListDevices | ShowDevice | ListApps | ShowApp | ListOperations | ShowOperation
            | ReadLogs | ReadEvents | WatchChanges | ListRegistries | ShowRegistry
            | ListRollouts | ShowRollout | ListRules | ShowRule | ListRuleFirings | ListJobs
            | ShowJob | ListAgentReleases => Role::Viewer,
        }
    }

    /// Whether it changes anything (and so is audited when it runs).
    pub fn is_change(self) -> bool {
        use CommandKind::*;
        match self {
            CreateApp | UpdateApp | ImportApp | DeleteApp | Deploy | Start | Stop | Remove
            | Pause | Unpause | Restart | SetLabels | Assign | Unassign | ClearOverride
            | SetRegistry | DeleteRegistry | CreateRollout | PauseRollout | ResumeRollout
            | ApproveRollout | AbortRollout | RollbackRollout | CreateEnrollToken
            | DeleteEnrollToken | RevokeDevice | CreateApiToken | DeleteApiToken
            | CreateMqttUser | DeleteMqttUser | CreateRule | UpdateRule | DeleteRule
            | CreateJob | CancelJob | UploadAgentRelease | DeleteAgentRelease => true,
            ListDevices | ShowDevice | ListApps | ShowApp | ListOperations | ShowOperation
            | ReadLogs | ReadEvents | WatchChanges | ListRegistries | ShowRegistry
            | ListRollouts | ShowRollout | ListEnrollTokens | ListApiTokens | ListMqttUsers
            | ReadAudit | ListRules | ShowRule | ListRuleFirings | ListJobs | ShowJob
            | ListAgentReleases => false,
        }
    }

    /// Its name in the audit log and in refusals.
    pub fn name(self) -> &'static str {
        use CommandKind::*;
        match self {
            CreateApp => "app.create",
            UpdateApp => "app.update",
            ImportApp => "app.import",
            DeleteApp => "app.delete",
            Deploy => "deploy",
            Start => "start",
            Stop => "stop",
            Remove => "remove",
            Pause => "pause",
            Unpause => "unpause",
            Restart => "restart",
            SetLabels => "device.labels.set",
            Assign => "app.assignment.set",
            Unassign => "app.assignment.delete",
            ClearOverride => "device.override.clear",
            SetRegistry => "registry.set",
            DeleteRegistry => "registry.delete",
            CreateRollout => "rollout.create",
            PauseRollout => "rollout.pause",
            ResumeRollout => "rollout.resume",
            ApproveRollout => "rollout.approve",
            AbortRollout => "rollout.abort",
            RollbackRollout => "rollout.rollback",
            ListRollouts => "rollouts.list",
            ShowRollout => "rollout.show",
            CreateEnrollToken => "enroll_token.create",
            DeleteEnrollToken => "enroll_token.delete",
            RevokeDevice => "device.revoke",
            CreateApiToken => "api_token.create",
            DeleteApiToken => "api_token.delete",
            CreateMqttUser => "mqtt_user.create",
            DeleteMqttUser => "mqtt_user.delete",
            ListDevices => "devices.list",
            ShowDevice => "device.show",
            ListApps => "apps.list",
            ShowApp => "app.show",
            ListOperations => "operations.list",
            ShowOperation => "operation.show",
            ReadLogs => "logs.read",
            ReadEvents => "events.read",
            WatchChanges => "changes.watch",
            ListRegistries => "registries.list",
            ShowRegistry => "registry.show",
            ListEnrollTokens => "enroll_tokens.list",
            ListApiTokens => "api_tokens.list",
            ListMqttUsers => "mqtt_users.list",
            ReadAudit => "audit.read",
            UploadAgentRelease => "agent_release.upload",
            DeleteAgentRelease => "agent_release.delete",
            ListAgentReleases => "agent_releases.list",
            CreateRule => "rule.create",
            UpdateRule => "rule.update",
            DeleteRule => "rule.delete",
            ListRules => "rules.list",
            ShowRule => "rule.show",
            ListRuleFirings => "rule_firings.list",
            CreateJob => "job.create",
            CancelJob => "job.cancel",
            ListJobs => "jobs.list",
            ShowJob => "job.show",
        }
    }
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The table every surface relies on: each kind has a role, a unique
    /// audit name, and the roles follow the rule "viewers read, operators
    /// change what runs, admins change who may do what".
    #[test]
    fn every_kind_has_a_role_and_an_audit_shape() {
        let mut names = HashSet::new();
        for kind in CommandKind::ALL {
            let name = kind.name();
            assert!(!name.is_empty(), "{kind:?} has no audit name");
            assert!(names.insert(name), "audit name {name} used twice");
            let role = kind.required_role();
            if !kind.is_change() && role == Role::Viewer {
                assert!(
                    name.ends_with(".list")
                        || name.ends_with(".show")
                        || name.ends_with(".read")
                        || name.ends_with(".watch"),
                    "{name}: a viewer may only read"
                );
            }
            if kind.is_change() {
                assert!(role >= Role::Operator, "{name} changes something");
            }
        }
        assert_eq!(names.len(), CommandKind::ALL.len());
    }

    #[test]
    fn the_table_of_roles() {
        use CommandKind::*;
        let expect = [
            (Deploy, Role::Operator),
            (Start, Role::Operator),
            (Stop, Role::Operator),
            (Remove, Role::Operator),
            (Pause, Role::Operator),
            (Unpause, Role::Operator),
            (Restart, Role::Operator),
            (SetLabels, Role::Operator),
            (CreateEnrollToken, Role::Operator),
            (ListEnrollTokens, Role::Operator),
            (CreateApp, Role::Admin),
            (UpdateApp, Role::Admin),
            (ImportApp, Role::Admin),
            (RevokeDevice, Role::Admin),
            (CreateApiToken, Role::Admin),
            (ListApiTokens, Role::Admin),
            (ListMqttUsers, Role::Admin),
            (ReadAudit, Role::Admin),
            (SetRegistry, Role::Admin),
            (ListDevices, Role::Viewer),
            (ShowOperation, Role::Viewer),
            (WatchChanges, Role::Viewer),
            (ListRegistries, Role::Viewer),
        ];
        for (kind, role) in expect {
            assert_eq!(kind.required_role(), role, "{kind}");
        }
    }

    #[test]
    fn every_command_maps_to_a_change_kind() {
        let spec: AppSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "containers": [{"name": "main", "image": "busybox:1"}]
        }))
        .expect("spec");
        let dev = DeviceId::new("pi-1").expect("id");
        let name = Name::new("web").expect("name");
        let commands = [
            Command::CreateApp(spec.clone()),
            Command::UpdateApp(spec.clone()),
            Command::ImportApp {
                spec,
                replace: true,
            },
            Command::DeleteApp(name.clone()),
            Command::Apply {
                device: dev.clone(),
                app: name.clone(),
                op: Op::Deploy,
            },
            Command::Apply {
                device: dev.clone(),
                app: name.clone(),
                op: Op::Remove,
            },
            Command::DeleteRegistry("r.example".into()),
            Command::CreateEnrollToken(NewEnrollToken::default()),
            Command::DeleteEnrollToken("x".into()),
            Command::RevokeDevice(dev),
            Command::CreateApiToken(NewApiToken {
                name: name.clone(),
                role: Role::Viewer,
            }),
            Command::DeleteApiToken("x".into()),
            Command::DeleteMqttUser(name),
        ];
        for c in commands {
            assert!(c.kind().is_change(), "{:?}", c.kind());
        }
    }

    #[test]
    fn actors_and_roles() {
        let viewer = Actor::ApiToken {
            name: "v".into(),
            role: Role::Viewer,
        };
        assert!(viewer.may(CommandKind::ListDevices));
        assert!(!viewer.may(CommandKind::Deploy));
        let device = Actor::Device(DeviceId::new("pi-1").expect("id"));
        assert!(!device.may(CommandKind::ListDevices));
        assert_eq!(device.name(), "device:pi-1");
        assert!(Actor::System.may(CommandKind::ReadAudit));
        let nr = Actor::Automation {
            name: "nr".into(),
            role: Role::Operator,
        };
        assert_eq!(nr.name(), "auto:nr");
        assert!(nr.may(CommandKind::Deploy));
        assert!(!nr.may(CommandKind::CreateApp));
    }
}
