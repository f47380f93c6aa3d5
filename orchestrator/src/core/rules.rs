//! Rule evaluation, pure: definitions are validated here ([`validate`]),
//! and [`RuleBook`] turns what happens in the fleet ([`Input`]) and the
//! passing of time ([`RuleBook::tick`]) into [`Firing`]s for the I/O shell
//! (`rules/`) to carry out. Time comes in as `now_ms`; nothing here does
//! I/O.
//!
//! State kept per rule and device: the cooldown's end, since when a
//! telemetry condition has held, since when a device is offline (and
//! whether an "offline for" rule fired for that outage), the last phase and
//! container states of every app (to see a change), and causation.
//!
//! Causation: a firing's device actions tag that device, and its publishes
//! tag their topics, with the chain of rules that led to them, for
//! [`CAUSE_WINDOW_MS`]. An input on a tagged device or topic carries the
//! chain; a rule already in its chain, or a chain of [`MAX_CHAIN`] rules, is
//! cut: the firing is reported with no action run.
//!
//! Conditions are CEL (`cel` crate): no loops, and at most
//! [`MAX_CONDITION_BYTES`], so one evaluation is bounded by its length.

use std::collections::{BTreeMap, HashMap};

use cel::{Context, ExecutionError, Program, Value};
use drover_shared::model::AppStatus;
use drover_shared::payload::{DeviceEvent, Telemetry};
use drover_shared::topic::Topics;
use drover_shared::{filter, DeviceId, Name};
use serde_json::{json, Value as Json};

use crate::contract::{Rule, RuleAction, Trigger};
use crate::core::selector::Selector;

/// The longest condition.
pub const MAX_CONDITION_BYTES: usize = 1024;
/// A rule's JSON may be no bigger (payloads of publish actions included).
pub const MAX_RULE_BYTES: usize = 16 * 1024;
pub const MAX_ACTIONS: usize = 8;
/// Rules at most.
pub const MAX_RULES: usize = 1000;
/// A chain of this many rules is cut before the next.
pub const MAX_CHAIN: usize = 4;
/// How long an action's consequences carry the chain that caused them.
pub const CAUSE_WINDOW_MS: u64 = 5_000;
const MAX_URL_BYTES: usize = 2048;

/// What is wrong with a rule, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError {
        field: field.into(),
        message: message.into(),
    }
}

/// The variables a trigger's condition may use.
pub fn variables(trigger: &Trigger) -> &'static [&'static str] {
    match trigger {
        Trigger::DeviceOnline | Trigger::DeviceOffline { .. } => &["device"],
        Trigger::DeviceEvent { .. } => &["device", "event"],
        Trigger::AppState { .. } => &["device", "app"],
        Trigger::Telemetry { .. } => &["device", "telemetry"],
        Trigger::Mqtt { .. } => &["message"],
    }
}

/// A rule checked and ready to evaluate.
pub struct Compiled {
    pub rule: Rule,
    selector: Selector,
    condition: Option<Program>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("rule", &self.rule)
            .finish()
    }
}

/// Checks a rule as it is saved: sizes, selector, condition (parsed, only
/// the trigger's variables, a boolean on a sample of the trigger's data),
/// topics outside `topics`' tree, webhook URLs.
pub fn validate(rule: &Rule, topics: &Topics) -> Result<Compiled, RuleError> {
    let size = serde_json::to_vec(rule).map_or(0, |v| v.len());
    if size > MAX_RULE_BYTES {
        return Err(err(
            "",
            format!("the rule is {size} bytes of JSON; at most {MAX_RULE_BYTES}"),
        ));
    }
    if rule.actions.is_empty() || rule.actions.len() > MAX_ACTIONS {
        return Err(err(
            "actions",
            format!(
                "a rule has 1 to {MAX_ACTIONS} actions, this one {}",
                rule.actions.len()
            ),
        ));
    }
    let selector = Selector::parse(&rule.selector).map_err(|e| {
        err(
            "selector",
            format!("selector {:?} is not valid: {e}", rule.selector),
        )
    })?;
    let device_less = matches!(rule.trigger, Trigger::Mqtt { .. });
    if let Trigger::Mqtt { filter: f } = &rule.trigger {
        outside_tree("trigger.filter", f, topics, true)?;
        if !selector.is_empty() {
            return Err(err(
                "selector",
                "an mqtt trigger has no device to select; leave the selector empty",
            ));
        }
    }
    if let Trigger::Telemetry { .. } = rule.trigger {
        if rule
            .condition
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
        {
            return Err(err(
                "condition",
                "a telemetry trigger needs a condition, e.g. telemetry.host.cpu_percent > 90.0",
            ));
        }
    }
    for (i, action) in rule.actions.iter().enumerate() {
        let field = format!("actions[{i}]");
        match action {
            RuleAction::Start { .. }
            | RuleAction::Stop { .. }
            | RuleAction::Restart { .. }
            | RuleAction::Deploy { .. }
            | RuleAction::Remove { .. }
            | RuleAction::SetLabel { .. }
                if device_less =>
            {
                return Err(err(
                    field,
                    format!(
                        "a {} action acts on the triggering device; an mqtt trigger has none",
                        action.kind()
                    ),
                ));
            }
            RuleAction::SetLabel { key, value } => {
                crate::core::selector::validate_key(key)
                    .map_err(|m| err(format!("{field}.key"), m))?;
                crate::core::selector::validate_value(value)
                    .map_err(|m| err(format!("{field}.value"), m))?;
            }
            RuleAction::PauseRollout { rollout } if rollout.is_empty() => {
                return Err(err(format!("{field}.rollout"), "a rollout id is needed"));
            }
            RuleAction::Publish { topic, payload, .. } => {
                outside_tree(&format!("{field}.topic"), topic, topics, false)?;
                if !payload.is_object() {
                    return Err(err(
                        format!("{field}.payload"),
                        "the payload must be a JSON object (the firing is added under `firing`)",
                    ));
                }
            }
            RuleAction::Webhook { url } => check_url(&format!("{field}.url"), url)?,
            _ => {}
        }
    }
    let condition = match rule.condition.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(compile(&rule.trigger, text)?),
    };
    Ok(Compiled {
        rule: rule.clone(),
        selector,
        condition,
    })
}

fn outside_tree(field: &str, f: &str, topics: &Topics, wildcards: bool) -> Result<(), RuleError> {
    let valid = if wildcards {
        filter::valid_filter(f)
    } else {
        filter::valid_filter(f) && !f.contains(['+', '#'])
    };
    if !valid || f.len() > 512 {
        return Err(err(
            field,
            format!(
                "{f:?} is not a valid MQTT {} of at most 512 bytes",
                if wildcards { "topic filter" } else { "topic" }
            ),
        ));
    }
    if f.starts_with('$') || filter::intersects(&topics.everything(), f) {
        return Err(err(
            field,
            format!(
                "{f:?} reaches {} or the broker's `$` topics; rules use topics outside the orchestrator's tree",
                topics.everything()
            ),
        ));
    }
    Ok(())
}

fn check_url(field: &str, url: &str) -> Result<(), RuleError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let host = rest
        .map(|r| r.split(['/', '?', '#']).next().unwrap_or(""))
        .unwrap_or("");
    let host_ok = !host.is_empty()
        && !host.contains('@')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
    if url.len() > MAX_URL_BYTES
        || !host_ok
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(err(
            field,
            format!(
                "{url:?} is not an http:// or https:// URL with a host (no credentials, at most {MAX_URL_BYTES} bytes)"
            ),
        ));
    }
    Ok(())
}

fn compile(trigger: &Trigger, text: &str) -> Result<Program, RuleError> {
    if text.len() > MAX_CONDITION_BYTES {
        return Err(err(
            "condition",
            format!(
                "the condition is {} bytes; at most {MAX_CONDITION_BYTES}",
                text.len()
            ),
        ));
    }
    let program = Program::compile(text).map_err(|e| {
        err(
            "condition",
            format!("not a CEL expression: {}", e.to_string().trim()),
        )
    })?;
    let allowed = variables(trigger);
    // Macros bind their own names (`exists(c, …)`), so only another
    // trigger's variable is named here; any other unknown name is an
    // undeclared reference in the trial below.
    const ALL: [&str; 5] = ["device", "event", "app", "telemetry", "message"];
    for v in program.references().variables() {
        if ALL.contains(&v) && !allowed.contains(&v) {
            return Err(err(
                "condition",
                format!(
                    "unknown variable `{v}`; a {} trigger offers {}",
                    trigger.kind(),
                    allowed.join(", ")
                ),
            ));
        }
    }
    // A trial on a sample of the trigger's data catches type errors (a
    // string compared with a number, a result that is not a boolean);
    // a missing key (a label, a field of an MQTT message) depends on the
    // data and is only false at run time.
    match evaluate(&program, &sample(trigger)) {
        Ok(Value::Bool(_)) => Ok(program),
        Ok(other) => Err(err(
            "condition",
            format!(
                "the condition must give a boolean; it gives {:?}",
                other.type_of()
            ),
        )),
        Err(ExecutionError::UndeclaredReference(name)) => Err(err(
            "condition",
            format!(
                "unknown variable `{name}`; a {} trigger offers {}",
                trigger.kind(),
                allowed.join(", ")
            ),
        )),
        Err(ExecutionError::NoSuchKey(_)) => Ok(program),
        Err(_) if matches!(trigger, Trigger::Mqtt { .. }) => Ok(program),
        Err(e) => Err(err("condition", format!("the condition fails: {e}"))),
    }
}

fn evaluate(program: &Program, vars: &Json) -> Result<Value, ExecutionError> {
    program.execute(&context(vars)?)
}

/// CEL's built-in functions, registered once: `Context::default()` boxes
/// and files every one of them, which cost more than evaluating a
/// threshold when it was done for every telemetry sample.
static FUNCTIONS: std::sync::LazyLock<Context<'static>> =
    std::sync::LazyLock::new(Context::default);

/// The variables as CEL values, in a scope under [`FUNCTIONS`]. Made once
/// per input and shared by every rule that looks at it: the conversion,
/// not the program, is most of an evaluation's cost.
fn context(vars: &Json) -> Result<Context<'static>, ExecutionError> {
    let mut ctx = FUNCTIONS.new_inner_scope();
    if let Json::Object(map) = vars {
        for (k, v) in map {
            ctx.add_variable(k.as_str(), v)
                .map_err(|e| ExecutionError::function_error("variables", e.to_string()))?;
        }
    }
    Ok(ctx)
}

fn sample(trigger: &Trigger) -> Json {
    let device = json!({"id": "pi-1", "labels": {}, "online": true});
    match trigger {
        Trigger::DeviceOnline | Trigger::DeviceOffline { .. } => json!({"device": device}),
        Trigger::DeviceEvent { .. } => json!({"device": device, "event": event_vars(&DeviceEvent {
            at_ms: 1,
            kind: drover_shared::payload::EventKind::DriftRepaired,
            app: None,
            container: None,
            detail: String::new(),
        })}),
        Trigger::AppState { app } => json!({"device": device, "app": {
            "name": app.as_str(), "state": "running", "previous_state": "running",
            "containers": [{"name": "main", "state": "running", "exit_code": 0, "restarts": 0, "health": ""}],
        }}),
        Trigger::Telemetry { .. } => {
            json!({"device": device, "telemetry": Telemetry::default()})
        }
        Trigger::Mqtt { .. } => json!({"message": {"topic": "t", "json": {}}}),
    }
}

fn event_vars(e: &DeviceEvent) -> Json {
    json!({
        "kind": e.kind,
        "app": e.app.as_ref().map_or("", |a| a.as_str()),
        "container": e.container.as_ref().map_or("", |c| c.as_str()),
        "detail": e.detail,
        "at_ms": e.at_ms,
    })
}

/// Something that happened, as rules see it. Device inputs carry the
/// device's effective labels.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Status {
        device: &'a DeviceId,
        labels: &'a BTreeMap<String, String>,
        online: bool,
    },
    Event {
        device: &'a DeviceId,
        labels: &'a BTreeMap<String, String>,
        event: &'a DeviceEvent,
    },
    /// A device's state report: every app it runs.
    Apps {
        device: &'a DeviceId,
        labels: &'a BTreeMap<String, String>,
        apps: &'a [AppStatus],
    },
    Telemetry {
        device: &'a DeviceId,
        labels: &'a BTreeMap<String, String>,
        telemetry: &'a Telemetry,
    },
    Message {
        topic: &'a str,
        payload: &'a [u8],
    },
}

/// A rule to carry out (or, `cut`, to report as cut).
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub rule: Name,
    pub device: Option<DeviceId>,
    pub trigger: &'static str,
    /// The variables the condition saw.
    pub value: Json,
    /// Empty when cut.
    pub actions: Vec<RuleAction>,
    /// The rules that led here, oldest first.
    pub chain: Vec<Name>,
    /// Why it was cut.
    pub cut: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Cause {
    Device(DeviceId),
    Topic(String),
}

/// An app's phase and its containers' (name, state), as last reported.
type AppSeen = (String, Vec<(String, String)>);

/// The rules and what evaluating them needs to remember.
#[derive(Debug, Default)]
pub struct RuleBook {
    rules: BTreeMap<Name, Compiled>,
    /// (rule, device or "") → no firing before.
    cooldown_until: HashMap<(Name, String), u64>,
    /// (rule, device) → since when the telemetry condition holds.
    held_since: HashMap<(Name, DeviceId), u64>,
    /// Offline devices, since when, and their labels then.
    offline: HashMap<DeviceId, (u64, BTreeMap<String, String>)>,
    /// "offline for" rules that fired for a device's current outage.
    offline_fired: HashMap<(Name, DeviceId), ()>,
    /// (device, app) → (phase, container states) last reported.
    apps: HashMap<(DeviceId, Name), AppSeen>,
    causes: HashMap<Cause, (Vec<Name>, u64)>,
}

impl RuleBook {
    /// Puts (or replaces) a rule, forgetting the old one's timers.
    pub fn put(&mut self, compiled: Compiled) {
        let name = compiled.rule.name.clone();
        self.forget(&name);
        self.rules.insert(name, compiled);
    }

    pub fn remove(&mut self, name: &Name) {
        self.forget(name);
        self.rules.remove(name);
    }

    fn forget(&mut self, name: &Name) {
        self.cooldown_until.retain(|(r, _), _| r != name);
        self.held_since.retain(|(r, _), _| r != name);
        self.offline_fired.retain(|(r, _), _| r != name);
    }

    pub fn names(&self) -> impl Iterator<Item = &Name> {
        self.rules.keys()
    }

    /// MQTT filters the enabled rules listen on.
    pub fn filters(&self) -> std::collections::BTreeSet<String> {
        self.enabled()
            .filter_map(|c| match &c.rule.trigger {
                Trigger::Mqtt { filter } => Some(filter.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether any enabled rule looks at app states (the shell reads a
    /// device's apps on a state report only then).
    pub fn watches_apps(&self) -> bool {
        self.enabled()
            .any(|c| matches!(c.rule.trigger, Trigger::AppState { .. }))
    }

    fn enabled(&self) -> impl Iterator<Item = &Compiled> {
        self.rules.values().filter(|c| c.rule.enabled)
    }

    /// What rules an input fires.
    pub fn observe(&mut self, input: Input<'_>, now_ms: u64) -> Vec<Firing> {
        self.causes.retain(|_, (_, until)| *until > now_ms);
        let mut candidates: Vec<(Name, Option<DeviceId>, Json)> = Vec::new();
        match input {
            Input::Status {
                device,
                labels,
                online,
            } => {
                if online {
                    self.offline.remove(device);
                    self.offline_fired.retain(|(_, d), _| d != device);
                } else {
                    self.offline
                        .entry(device.clone())
                        .or_insert_with(|| (now_ms, labels.clone()));
                }
                let vars = json!({"device": device_vars(device, labels, online)});
                for c in self.enabled() {
                    let hit = match c.rule.trigger {
                        Trigger::DeviceOnline => online,
                        Trigger::DeviceOffline { for_secs: 0 } => !online,
                        _ => false,
                    };
                    if hit && c.selector.matches(labels) {
                        candidates.push((c.rule.name.clone(), Some(device.clone()), vars.clone()));
                    }
                }
            }
            Input::Event {
                device,
                labels,
                event,
            } => {
                let vars = json!({"device": device_vars(device, labels, true), "event": event_vars(event)});
                for c in self.enabled() {
                    if let Trigger::DeviceEvent { kinds } = &c.rule.trigger {
                        if (kinds.is_empty() || kinds.contains(&event.kind))
                            && c.selector.matches(labels)
                        {
                            candidates.push((
                                c.rule.name.clone(),
                                Some(device.clone()),
                                vars.clone(),
                            ));
                        }
                    }
                }
            }
            Input::Apps {
                device,
                labels,
                apps,
            } => {
                for app in apps {
                    let phase = json!(app.phase).as_str().unwrap_or_default().to_string();
                    let containers: Vec<(String, String)> = app
                        .containers
                        .iter()
                        .map(|c| (c.name.to_string(), c.state.clone()))
                        .collect();
                    let key = (device.clone(), app.name.clone());
                    let now = (phase.clone(), containers);
                    let before = self.apps.insert(key, now.clone());
                    // The first report of an app is where it starts from,
                    // not a change.
                    let Some(before) = before.filter(|b| *b != now) else {
                        continue;
                    };
                    let vars = json!({
                        "device": device_vars(device, labels, true),
                        "app": {
                            "name": app.name.as_str(),
                            "state": phase,
                            "previous_state": before.0,
                            "containers": app.containers.iter().map(|c| json!({
                                "name": c.name.as_str(),
                                "state": c.state,
                                "exit_code": c.exit_code.unwrap_or(0),
                                "restarts": c.restarts,
                                "health": c.health.map(|h| json!(h)).unwrap_or(json!("")),
                            })).collect::<Vec<_>>(),
                        },
                    });
                    for c in self.enabled() {
                        if let Trigger::AppState { app: name } = &c.rule.trigger {
                            if *name == app.name && c.selector.matches(labels) {
                                candidates.push((
                                    c.rule.name.clone(),
                                    Some(device.clone()),
                                    vars.clone(),
                                ));
                            }
                        }
                    }
                }
            }
            Input::Telemetry {
                device,
                labels,
                telemetry,
            } => {
                // A sample per device every few seconds: its variables
                // are made only when a rule looks, and made into CEL
                // values once for all the rules that do.
                let mut vars = Json::Null;
                let mut ctx = None;
                let mut held = Vec::new();
                for c in self.enabled() {
                    if let Trigger::Telemetry { for_secs } = c.rule.trigger {
                        if c.selector.matches(labels) {
                            if vars.is_null() {
                                vars = json!({"device": device_vars(device, labels, true), "telemetry": telemetry});
                            }
                            let ctx = ctx.get_or_insert_with(|| context(&vars).ok());
                            let holds = match (&c.condition, ctx) {
                                (None, _) => true,
                                (Some(p), Some(ctx)) => {
                                    matches!(p.execute(ctx), Ok(Value::Bool(true)))
                                }
                                (Some(_), None) => false,
                            };
                            held.push((c.rule.name.clone(), for_secs, holds));
                        }
                    }
                }
                for (name, for_secs, holds) in held {
                    let key = (name.clone(), device.clone());
                    if !holds {
                        self.held_since.remove(&key);
                        continue;
                    }
                    let since = *self.held_since.entry(key).or_insert(now_ms);
                    if now_ms.saturating_sub(since) >= for_secs * 1000 {
                        let mut v = vars.clone();
                        v["held_ms"] = json!(now_ms - since);
                        candidates.push((name, Some(device.clone()), v));
                    }
                }
            }
            Input::Message { topic, payload } => {
                let parsed: Json = serde_json::from_slice(payload).unwrap_or(Json::Null);
                let vars = json!({"message": {"topic": topic, "json": parsed}});
                for c in self.enabled() {
                    if let Trigger::Mqtt { filter: f } = &c.rule.trigger {
                        if filter::matches(f, topic) {
                            candidates.push((c.rule.name.clone(), None, vars.clone()));
                        }
                    }
                }
            }
        }
        let chain = match input {
            Input::Message { topic, .. } => self.chain_of(&Cause::Topic(topic.to_string())),
            Input::Status { device, .. }
            | Input::Event { device, .. }
            | Input::Apps { device, .. }
            | Input::Telemetry { device, .. } => self.chain_of(&Cause::Device(device.clone())),
        };
        let telemetry = matches!(input, Input::Telemetry { .. });
        candidates
            .into_iter()
            .filter_map(|(name, device, vars)| {
                // Telemetry conditions were checked while tracking the hold.
                self.fire(&name, device, vars, chain.clone(), now_ms, !telemetry)
            })
            .collect()
    }

    /// Offline-for timers.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Firing> {
        let mut due = Vec::new();
        for c in self.enabled() {
            let Trigger::DeviceOffline { for_secs } = c.rule.trigger else {
                continue;
            };
            if for_secs == 0 {
                continue;
            }
            for (device, (since, labels)) in &self.offline {
                let key = (c.rule.name.clone(), device.clone());
                if now_ms.saturating_sub(*since) >= for_secs * 1000
                    && !self.offline_fired.contains_key(&key)
                    && c.selector.matches(labels)
                {
                    let mut vars = json!({"device": device_vars(device, labels, false)});
                    vars["offline_ms"] = json!(now_ms - since);
                    due.push((key, vars));
                }
            }
        }
        let mut out = Vec::new();
        for ((name, device), vars) in due {
            self.offline_fired
                .insert((name.clone(), device.clone()), ());
            let chain = self.chain_of(&Cause::Device(device.clone()));
            out.extend(self.fire(&name, Some(device), vars, chain, now_ms, true));
        }
        out
    }

    fn chain_of(&self, cause: &Cause) -> Vec<Name> {
        self.causes
            .get(cause)
            .map(|(chain, _)| chain.clone())
            .unwrap_or_default()
    }

    fn fire(
        &mut self,
        name: &Name,
        device: Option<DeviceId>,
        vars: Json,
        chain: Vec<Name>,
        now_ms: u64,
        check_condition: bool,
    ) -> Option<Firing> {
        let c = self.rules.get(name)?;
        if check_condition && !condition(c, &vars) {
            return None;
        }
        let key = (
            name.clone(),
            device.as_ref().map_or(String::new(), |d| d.to_string()),
        );
        if self.cooldown_until.get(&key).is_some_and(|t| *t > now_ms) {
            return None;
        }
        self.cooldown_until
            .insert(key, now_ms + c.rule.cooldown_secs * 1000);
        let trigger = c.rule.trigger.kind();
        let cut = if chain.contains(name) {
            Some(format!(
                "rule {name} was triggered again by its own actions (chain {})",
                join(&chain)
            ))
        } else if chain.len() >= MAX_CHAIN {
            Some(format!(
                "a chain of {} rules ({}) is as long as a chain may get",
                chain.len(),
                join(&chain)
            ))
        } else {
            None
        };
        if cut.is_some() {
            return Some(Firing {
                rule: name.clone(),
                device,
                trigger,
                value: vars,
                actions: Vec::new(),
                chain,
                cut,
            });
        }
        let actions = c.rule.actions.clone();
        let mut next = chain.clone();
        next.push(name.clone());
        let until = now_ms + CAUSE_WINDOW_MS;
        for a in &actions {
            let cause = match a {
                RuleAction::Publish { topic, .. } => Cause::Topic(topic.clone()),
                RuleAction::Start { .. }
                | RuleAction::Stop { .. }
                | RuleAction::Restart { .. }
                | RuleAction::Deploy { .. }
                | RuleAction::Remove { .. }
                | RuleAction::SetLabel { .. } => match &device {
                    Some(d) => Cause::Device(d.clone()),
                    None => continue,
                },
                RuleAction::PauseRollout { .. } | RuleAction::Webhook { .. } => continue,
            };
            self.causes.insert(cause, (next.clone(), until));
        }
        Some(Firing {
            rule: name.clone(),
            device,
            trigger,
            value: vars,
            actions,
            chain,
            cut: None,
        })
    }
}

fn join(chain: &[Name]) -> String {
    chain
        .iter()
        .map(Name::as_str)
        .collect::<Vec<_>>()
        .join(" → ")
}

fn device_vars(device: &DeviceId, labels: &BTreeMap<String, String>, online: bool) -> Json {
    json!({"id": device.as_str(), "labels": labels, "online": online})
}

/// Whether the rule's condition holds; an error (a missing key, a message
/// that is not the JSON it expects) counts as false.
fn condition(c: &Compiled, vars: &Json) -> bool {
    match &c.condition {
        None => true,
        Some(p) => matches!(evaluate(p, vars), Ok(Value::Bool(true))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::default()
    }

    fn rule(v: Json) -> Rule {
        serde_json::from_value(v).expect("rule json")
    }

    fn book(rules: &[Json]) -> RuleBook {
        let mut b = RuleBook::default();
        for r in rules {
            b.put(validate(&rule(r.clone()), &topics()).expect("valid"));
        }
        b
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }

    fn tele(cpu: f32) -> Telemetry {
        Telemetry {
            at_ms: 1,
            host: drover_shared::payload::HostMetrics {
                cpu_percent: cpu,
                ..Default::default()
            },
            containers: Vec::new(),
        }
    }

    fn bad(v: Json) -> RuleError {
        validate(&rule(v), &topics()).expect_err("invalid")
    }

    #[test]
    fn a_telemetry_threshold_must_hold_for_its_duration_and_respects_the_cooldown() {
        let mut b = book(&[json!({
            "name": "hot", "trigger": {"type": "telemetry", "for_secs": 10},
            "condition": "telemetry.host.cpu_percent > 90.0",
            "actions": [{"type": "stop", "app": "web"}], "cooldown_secs": 60
        })]);
        let d = dev("pi-1");
        let labels = BTreeMap::new();
        let at = |b: &mut RuleBook, cpu: f32, now: u64| {
            b.observe(
                Input::Telemetry {
                    device: &d,
                    labels: &labels,
                    telemetry: &tele(cpu),
                },
                now,
            )
            .len()
        };
        assert_eq!(at(&mut b, 95.0, 0), 0, "held for 0 s");
        assert_eq!(at(&mut b, 95.0, 5_000), 0, "held for 5 s");
        assert_eq!(at(&mut b, 50.0, 9_000), 0, "the hold breaks");
        assert_eq!(at(&mut b, 95.0, 10_000), 0, "held again from 10 s");
        assert_eq!(at(&mut b, 95.0, 19_000), 0, "9 s");
        assert_eq!(at(&mut b, 95.0, 20_000), 1, "held for 10 s: fires");
        assert_eq!(at(&mut b, 95.0, 25_000), 0, "cooldown");
        assert_eq!(at(&mut b, 95.0, 79_999), 0, "cooldown still");
        assert_eq!(at(&mut b, 95.0, 80_000), 1, "cooldown over, still held");
    }

    #[test]
    fn offline_for_fires_once_per_outage_after_its_duration() {
        let mut b = book(&[json!({
            "name": "gone", "trigger": {"type": "device_offline", "for_secs": 60},
            "selector": "site=a",
            "actions": [{"type": "publish", "topic": "alerts/gone"}]
        })]);
        let d = dev("pi-1");
        let a: BTreeMap<String, String> = [("site".to_string(), "a".to_string())].into();
        let status = |b: &mut RuleBook, online: bool, now: u64| {
            b.observe(
                Input::Status {
                    device: &d,
                    labels: &a,
                    online,
                },
                now,
            )
        };
        assert!(status(&mut b, false, 1_000).is_empty());
        assert!(b.tick(60_999).is_empty(), "59.999 s");
        let fired = b.tick(61_000);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].device, Some(d.clone()));
        assert!(b.tick(200_000).is_empty(), "once per outage");
        assert!(status(&mut b, true, 210_000).is_empty());
        assert!(status(&mut b, false, 220_000).is_empty());
        assert_eq!(b.tick(280_000).len(), 1, "a new outage fires again");
        // Another site's device is not selected.
        let other = dev("pi-2");
        let labels_b: BTreeMap<String, String> = [("site".to_string(), "b".to_string())].into();
        b.observe(
            Input::Status {
                device: &other,
                labels: &labels_b,
                online: false,
            },
            300_000,
        );
        assert!(b.tick(900_000).is_empty());
    }

    #[test]
    fn a_loop_of_rules_is_cut_when_a_rule_comes_round_again() {
        let mut b = book(&[
            json!({"name": "a", "trigger": {"type": "mqtt", "filter": "loop/a"},
                   "actions": [{"type": "publish", "topic": "loop/b"}]}),
            json!({"name": "b", "trigger": {"type": "mqtt", "filter": "loop/b"},
                   "actions": [{"type": "publish", "topic": "loop/a"}]}),
        ]);
        let msg = |b: &mut RuleBook, topic: &str, now: u64| {
            b.observe(
                Input::Message {
                    topic,
                    payload: b"{}",
                },
                now,
            )
        };
        let f = msg(&mut b, "loop/a", 0);
        assert_eq!(
            (f.len(), f[0].rule.as_str(), f[0].cut.is_none()),
            (1, "a", true)
        );
        let f = msg(&mut b, "loop/b", 10);
        assert_eq!(f[0].chain, vec![Name::new("a").expect("name")]);
        assert!(f[0].cut.is_none());
        let f = msg(&mut b, "loop/a", 20);
        assert_eq!(f.len(), 1);
        assert!(f[0].actions.is_empty(), "nothing runs");
        let why = f[0].cut.clone().expect("cut");
        assert!(why.contains("a → b"), "{why}");
        // Outside the window the topic carries no chain: a fresh start.
        let f = msg(&mut b, "loop/a", 20 + CAUSE_WINDOW_MS + 1);
        assert!(f[0].cut.is_none());
    }

    #[test]
    fn a_long_chain_is_cut() {
        let rules: Vec<Json> = (0..6)
            .map(|i| {
                json!({"name": format!("r{i}"), "trigger": {"type": "mqtt", "filter": format!("c/{i}")},
                       "actions": [{"type": "publish", "topic": format!("c/{}", i + 1)}]})
            })
            .collect();
        let mut b = book(&rules);
        let mut cut_at = None;
        for i in 0..6 {
            let f = b.observe(
                Input::Message {
                    topic: &format!("c/{i}"),
                    payload: b"{}",
                },
                i,
            );
            if f[0].cut.is_some() {
                cut_at = Some(i);
                break;
            }
        }
        assert_eq!(cut_at, Some(MAX_CHAIN as u64));
    }

    #[test]
    fn an_app_state_change_fires_with_the_previous_state_and_the_condition_filters() {
        let mut b = book(&[json!({
            "name": "revive", "trigger": {"type": "app_state", "app": "web"},
            "condition": "app.containers.exists(c, c.state != 'running')",
            "actions": [{"type": "start", "app": "web"}], "cooldown_secs": 0
        })]);
        let d = dev("pi-1");
        let labels = BTreeMap::new();
        let status = |state: &str| -> Vec<AppStatus> {
            serde_json::from_value(json!([{"name": "web", "phase": "running", "containers": [
                {"name": "main", "image": "x", "state": state}]}]))
            .expect("status")
        };
        let see = |b: &mut RuleBook, state: &str, now: u64| {
            b.observe(
                Input::Apps {
                    device: &d,
                    labels: &labels,
                    apps: &status(state),
                },
                now,
            )
        };
        assert!(
            see(&mut b, "running", 0).is_empty(),
            "the first report is the start"
        );
        assert!(see(&mut b, "running", 1).is_empty(), "no change");
        let f = see(&mut b, "exited", 2);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].value["app"]["previous_state"], json!("running"));
        assert!(see(&mut b, "running", 3).is_empty(), "condition false");
        // Its own start tagged the device: coming round again within the
        // window is a cut.
        let f = see(&mut b, "exited", 4);
        assert!(f[0].cut.is_some());
    }

    #[test]
    fn events_filter_by_kind() {
        let mut b = book(&[json!({
            "name": "drift", "trigger": {"type": "device_event", "kinds": ["drift_repaired"]},
            "condition": "event.app == 'web'",
            "actions": [{"type": "webhook", "url": "http://127.0.0.1:9/x"}]
        })]);
        let d = dev("pi-1");
        let labels = BTreeMap::new();
        let ev = |kind, app: &str| DeviceEvent {
            at_ms: 1,
            kind,
            app: Some(Name::new(app).expect("name")),
            container: None,
            detail: String::new(),
        };
        use drover_shared::payload::EventKind;
        for (e, n) in [
            (ev(EventKind::DriftRepaired, "web"), 1),
            (ev(EventKind::DriftRepaired, "db"), 0),
            (ev(EventKind::PullRetrying, "web"), 0),
        ] {
            let f = b.observe(
                Input::Event {
                    device: &d,
                    labels: &labels,
                    event: &e,
                },
                0,
            );
            assert_eq!(f.len(), n, "{e:?}");
        }
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let base = |extra: Json| {
            let mut r = json!({"name": "r", "trigger": {"type": "device_online"},
                               "actions": [{"type": "start", "app": "web"}]});
            for (k, v) in extra.as_object().expect("object") {
                r[k] = v.clone();
            }
            r
        };
        let cases = [
            (
                base(json!({"condition": "device.id =="})),
                "condition",
                "not a CEL",
            ),
            (
                base(json!({"condition": "telemetry.host.cpu_percent > 1.0"})),
                "condition",
                "unknown variable `telemetry`",
            ),
            (base(json!({"condition": "device.id + 1"})), "condition", ""),
            (base(json!({"condition": "1 + 2"})), "condition", "boolean"),
            (
                base(json!({"condition": "nope == 1"})),
                "condition",
                "unknown variable `nope`",
            ),
            (
                base(json!({"condition": "x".repeat(2000)})),
                "condition",
                "at most 1024",
            ),
            (
                base(json!({"selector": "a in (b"})),
                "selector",
                "not valid",
            ),
            (base(json!({"actions": []})), "actions", "1 to 8"),
            (
                base(json!({"actions": [{"type": "publish", "topic": "drover/v1/x"}]})),
                "actions[0].topic",
                "drover/#",
            ),
            (
                base(json!({"actions": [{"type": "publish", "topic": "a/+"}]})),
                "actions[0].topic",
                "not a valid",
            ),
            (
                base(json!({"actions": [{"type": "publish", "topic": "a", "payload": [1]}]})),
                "actions[0].payload",
                "object",
            ),
            (
                base(json!({"actions": [{"type": "webhook", "url": "ftp://x"}]})),
                "actions[0].url",
                "http://",
            ),
            (
                base(json!({"actions": [{"type": "webhook", "url": "http://u:p@x/"}]})),
                "actions[0].url",
                "credentials",
            ),
            (
                base(json!({"actions": [{"type": "set_label", "key": "bad key", "value": "v"}]})),
                "actions[0].key",
                "",
            ),
            (
                json!({"name": "r", "trigger": {"type": "mqtt", "filter": "drover/#"}, "actions": [{"type": "publish", "topic": "x"}]}),
                "trigger.filter",
                "drover/#",
            ),
            (
                json!({"name": "r", "trigger": {"type": "mqtt", "filter": "x"}, "actions": [{"type": "stop", "app": "web"}]}),
                "actions[0]",
                "no",
            ),
            (
                json!({"name": "r", "trigger": {"type": "telemetry"}, "actions": [{"type": "stop", "app": "web"}]}),
                "condition",
                "needs a condition",
            ),
            (
                base(
                    json!({"actions": [{"type": "publish", "topic": "a", "payload": {"x": "y".repeat(20_000)}}]}),
                ),
                "",
                "at most",
            ),
        ];
        for (r, field, words) in cases {
            let e = bad(r.clone());
            assert!(
                e.field.ends_with(field) || (field.is_empty() && e.field.is_empty()),
                "{r}: {e:?}"
            );
            assert!(e.message.contains(words), "{r}: {e:?}");
        }
        // A good one of each trigger passes.
        for t in [
            json!({"type": "device_offline", "for_secs": 30}),
            json!({"type": "app_state", "app": "web"}),
        ] {
            validate(
                &rule(base(
                    json!({"trigger": t, "condition": "device.labels.site == 'a'"}),
                )),
                &topics(),
            )
            .expect("valid");
        }
    }
}
