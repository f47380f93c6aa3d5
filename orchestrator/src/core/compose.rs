//! Compose files (compose-spec) to Drover apps, for `drover apps import`.
//!
//! Pure: YAML text in, a validated [`AppSpec`] or a [`FieldError`] out.
//! Every key Drover cannot honour, at any level, is refused by its path
//! (`services.web.build`, `networks`) rather than dropped: a file that
//! silently loses a key would run something other than what it says.
//! Keys starting with `x-` (Compose's extension fields) are ignored, as
//! Compose itself ignores them; YAML anchors, aliases and merge keys
//! (`<<: *common`) work as in Compose.
//!
//! Decisions where Compose depends on the importing machine, or where the
//! model differs:
//! - `environment` entries without a value (`- KEY`, `KEY:` with null)
//!   are refused: Compose fills them from the shell that runs it, and the
//!   orchestrator's environment is not the user's.
//! - Relative bind mounts (`./data:/data`) are refused: they are relative
//!   to the Compose file's directory on the user's machine. Absolute host
//!   paths become `host_mounts`.
//! - `entrypoint` is refused: the model has no entrypoint override.
//! - Service `labels` (other than empty) are refused. They are Docker
//!   container labels, read by tools on the device (a reverse proxy's
//!   routing rules, say); the model has no container labels, and folding
//!   them into the app's own labels would change what they mean and still
//!   leave the containers without them.
//! - A service without `restart` gets Drover's default, `unless-stopped`,
//!   not Compose's `no`: a device brings its apps back after a reboot.
//! - `depends_on` conditions `service_started` and `service_healthy` both
//!   become a start-order dependency; the agent waits for a dependency to
//!   be healthy where it has a health check, running otherwise.
//!
//! Input is bounded before anything is built from it: at most
//! [`MAX_COMPOSE_BYTES`] of text, and — because YAML aliases repeat what
//! they point to, so a small file can stand for a huge one — at most
//! [`MAX_NODES`] values and [`MAX_TEXT_BYTES`] of strings once aliases are
//! expanded. serde_yaml_ng's own limits (nesting deeper than 128, more
//! alias jumps than 100 per event) stop the exponential "billion laughs"
//! but not a quadratic one: one anchor of N items aliased N times, which a
//! 40 KB file makes into gigabytes. The budget stops both, while the file
//! is read.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use drover_shared::model::{
    AppSpec, ContainerSpec, DeviceMapping, FieldError, HealthCheck, HostMount, NetworkMode,
    PortMapping, Protocol, RestartPolicy, VolumeBind,
};
use drover_shared::Name;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::{Mapping, Value};

/// Largest Compose file accepted, in bytes.
pub const MAX_COMPOSE_BYTES: usize = 256 * 1024;

/// Most values (scalars, lists, mappings) a file may stand for once its
/// aliases are expanded. A file of [`MAX_COMPOSE_BYTES`] written out in
/// full has at most about 130,000.
pub const MAX_NODES: usize = 250_000;

/// Most bytes of strings a file may stand for once its aliases are
/// expanded.
pub const MAX_TEXT_BYTES: usize = 4 * 1024 * 1024;

type R<T> = Result<T, FieldError>;

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> R<T> {
    Err(FieldError::new(field, message))
}

/// Converts a Compose file to an app spec. `name` wins over the file's
/// top-level `name:`; one of them must be there.
pub fn import(yaml: &str, name: Option<&str>) -> R<AppSpec> {
    if yaml.len() > MAX_COMPOSE_BYTES {
        return err(
            "",
            format!(
                "the Compose file is {} bytes; at most {MAX_COMPOSE_BYTES} are accepted",
                yaml.len()
            ),
        );
    }
    let mut doc = load(yaml)?;
    // Merge keys are not applied by the parser; Compose applies them.
    doc.apply_merge()
        .map_err(|e| FieldError::new("", format!("a YAML merge key (`<<`) is not valid: {e}")))?;
    let mut doc = match doc {
        Value::Mapping(m) => m,
        _ => return err("", "a Compose file is a mapping with a `services` key"),
    };
    let mut file_name = None;
    let mut services = None;
    let mut declared_volumes = BTreeSet::new();
    for (k, v) in std::mem::take(&mut doc) {
        let key = key_str(&k, "")?;
        match key.as_str() {
            k if k.starts_with("x-") => {}
            "version" => {} // obsolete in compose-spec, informative only
            "name" => file_name = Some(string(&v, "name")?),
            "services" => services = Some(v),
            "volumes" => declared_volumes = top_volumes(&v)?,
            other => return unsupported(other),
        }
    }
    let app_name = match name.map(str::to_owned).or(file_name) {
        Some(n) => n,
        None => {
            return err(
                "name",
                "no app name: give one, or a top-level `name:` in the file",
            )
        }
    };
    let app_name = Name::new(app_name.clone())
        .map_err(|e| FieldError::new("name", format!("`{app_name}`: {e}")))?;
    let services = match services {
        Some(Value::Mapping(m)) if !m.is_empty() => m,
        Some(_) => return err("services", "must be a non-empty mapping of services"),
        None => return err("services", "required"),
    };
    let mut containers = Vec::new();
    for (k, v) in services {
        let sname = key_str(&k, "services")?;
        containers.push(service(&sname, v, &declared_volumes)?);
    }
    let mut spec = AppSpec {
        name: app_name,
        containers,
        labels: BTreeMap::new(),
    };
    spec.validate()
        .map_err(|e| in_compose_terms(e, &spec.containers))?;
    Ok(spec)
}

/// Parses the YAML text into a value within the budget of
/// [`MAX_NODES`] and [`MAX_TEXT_BYTES`]. Errors carry serde_yaml_ng's
/// line and column.
fn load(yaml: &str) -> R<Value> {
    let budget = Budget {
        nodes: Cell::new(0),
        text: Cell::new(0),
    };
    BudgetSeed(&budget)
        .deserialize(serde_yaml_ng::Deserializer::from_str(yaml))
        .map_err(|e| FieldError::new("", format!("not valid YAML: {e}")))
}

/// What the file has cost so far, counted as serde_yaml_ng hands out each
/// value: an alias is handed out again in full each time it is used, so
/// this counts the expanded document.
struct Budget {
    nodes: Cell<usize>,
    text: Cell<usize>,
}

impl Budget {
    fn take<E: de::Error>(&self, text: usize) -> Result<(), E> {
        self.nodes.set(self.nodes.get() + 1);
        self.text.set(self.text.get().saturating_add(text));
        if self.nodes.get() > MAX_NODES || self.text.get() > MAX_TEXT_BYTES {
            return Err(E::custom(format!(
                "the file stands for more than {MAX_NODES} values or {MAX_TEXT_BYTES} bytes of text once its aliases are expanded"
            )));
        }
        Ok(())
    }
}

/// Builds a [`Value`] as serde_yaml_ng's own `Deserialize` does, charging
/// each value to the budget; refuses duplicate keys as it does, and YAML
/// tags (Compose's `!reset`, `!override`), which Drover does not support.
#[derive(Clone, Copy)]
struct BudgetSeed<'a>(&'a Budget);

impl<'de> DeserializeSeed<'de> for BudgetSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BudgetSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.0.take(s.len())?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.0.take(s.len())?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.take(0)?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.take(0)?;
        let mut out = Mapping::new();
        while let Some(k) = map.next_key_seed(self)? {
            if out.contains_key(&k) {
                let shown = match &k {
                    Value::String(s) => format!("{s:?}"),
                    other => format!("{other:?}"),
                };
                return Err(de::Error::custom(format!("duplicate key {shown}")));
            }
            let v = map.next_value_seed(self)?;
            out.insert(k, v);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, _) = data.variant::<String>()?;
        Err(de::Error::custom(format!(
            "YAML tags such as `!{tag}` are not supported by Drover",
            tag = tag.trim_start_matches('!')
        )))
    }
}

/// `AppSpec::validate` names fields by the model's paths
/// (`containers[1].env.KEY`); the person importing wrote a Compose file,
/// so its errors name the service and its Compose key where there is one
/// (`services.web.environment.KEY`).
fn in_compose_terms(e: FieldError, containers: &[ContainerSpec]) -> FieldError {
    let mut field = e.field.clone();
    let mut message = e.message.clone();
    for (i, c) in containers.iter().enumerate() {
        let model = format!("containers[{i}]");
        let compose = join("services", c.name.as_str());
        message = message.replace(&model, &compose);
        let Some(rest) = field.strip_prefix(model.as_str()) else {
            continue;
        };
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        // The model's key up to its first '.' or '[', and what follows.
        let cut = rest.find(['.', '[']).unwrap_or(rest.len());
        let (key, tail) = rest.split_at(cut);
        field = match key {
            "" => compose,
            "env" => format!("{compose}.environment{tail}"),
            // Compose's `volumes` holds both kinds of mount, and one
            // port entry may stand for several: their indexes differ.
            "volumes" | "host_mounts" => format!("{compose}.volumes"),
            "ports" => format!("{compose}.ports"),
            "memory_mb" => format!("{compose}.mem_limit"),
            // Same name and shape in both, indexes included.
            "image" | "command" | "cpus" | "cap_add" | "devices" | "depends_on" | "name" => {
                format!("{compose}.{key}{tail}")
            }
            "healthcheck" => format!("{compose}.healthcheck"),
            other => format!("{compose}.{other}"),
        };
        break;
    }
    FieldError::new(field, message)
}

fn unsupported<T>(path: &str) -> R<T> {
    err(path, "not supported by Drover")
}

fn key_str(k: &Value, parent: &str) -> R<String> {
    match k {
        Value::String(s) => Ok(s.clone()),
        _ => err(parent, "keys must be strings"),
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn string(v: &Value, path: &str) -> R<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => err(path, "must be a string"),
    }
}

fn mapping(v: Value, path: &str) -> R<Mapping> {
    match v {
        Value::Mapping(m) => Ok(m),
        _ => err(path, "must be a mapping"),
    }
}

fn seq(v: Value, path: &str) -> R<Vec<Value>> {
    match v {
        Value::Sequence(s) => Ok(s),
        _ => err(path, "must be a list"),
    }
}

fn boolean(v: &Value, path: &str) -> R<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        _ => err(path, "must be true or false"),
    }
}

/// Iterates a mapping's keys as strings, skipping `x-` extensions.
fn entries(m: Mapping, path: &str) -> R<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for (k, v) in m {
        let k = key_str(&k, path)?;
        if !k.starts_with("x-") {
            out.push((k, v));
        }
    }
    Ok(out)
}

fn top_volumes(v: &Value) -> R<BTreeSet<String>> {
    let m = match v {
        Value::Null => return Ok(BTreeSet::new()),
        v => mapping(v.clone(), "volumes")?,
    };
    let mut out = BTreeSet::new();
    for (name, decl) in entries(m, "volumes")? {
        let path = join("volumes", &name);
        match decl {
            Value::Null => {}
            Value::Mapping(d) => {
                if let Some((k, _)) = entries(d, &path)?.into_iter().next() {
                    return unsupported(&join(&path, &k));
                }
            }
            _ => return err(&path, "must be empty or a mapping"),
        }
        out.insert(name);
    }
    Ok(out)
}

fn service(sname: &str, v: Value, declared: &BTreeSet<String>) -> R<ContainerSpec> {
    let base = join("services", sname);
    let name = Name::new(sname).map_err(|e| FieldError::new(&base, format!("`{sname}`: {e}")))?;
    let mut c = ContainerSpec {
        name,
        image: String::new(),
        command: None,
        env: BTreeMap::new(),
        ports: Vec::new(),
        volumes: Vec::new(),
        restart: RestartPolicy::default(),
        memory_mb: None,
        cpus: None,
        privileged: false,
        network_mode: NetworkMode::default(),
        cap_add: Vec::new(),
        devices: Vec::new(),
        host_mounts: Vec::new(),
        healthcheck: None,
        depends_on: Vec::new(),
    };
    let mut has_image = false;
    for (key, v) in entries(mapping(v, &base)?, &base)? {
        let path = join(&base, &key);
        match key.as_str() {
            "image" => {
                c.image = string(&v, &path)?;
                has_image = true;
            }
            "command" => c.command = Some(command(v, &path)?),
            "environment" => c.env = environment(v, &path)?,
            "ports" => {
                for (i, p) in seq(v, &path)?.into_iter().enumerate() {
                    c.ports.extend(port(p, &format!("{path}[{i}]"))?);
                }
            }
            "volumes" => {
                for (i, m) in seq(v, &path)?.into_iter().enumerate() {
                    mount(m, &format!("{path}[{i}]"), declared, &mut c)?;
                }
            }
            "restart" => {
                c.restart = match string(&v, &path)?.as_str() {
                    "no" | "false" => RestartPolicy::No,
                    "always" => RestartPolicy::Always,
                    "on-failure" => RestartPolicy::OnFailure,
                    "unless-stopped" => RestartPolicy::UnlessStopped,
                    other => {
                        return err(
                            &path,
                            format!("`{other}`: one of no, always, on-failure, unless-stopped"),
                        )
                    }
                }
            }
            "healthcheck" => c.healthcheck = healthcheck(v, &path)?,
            "depends_on" => c.depends_on = depends_on(v, &path)?,
            "deploy" => deploy(v, &path, &mut c)?,
            "mem_limit" => c.memory_mb = Some(memory_mb(&v, &path)?),
            "cpus" => c.cpus = Some(cpus(&v, &path)?),
            "privileged" => c.privileged = boolean(&v, &path)?,
            "cap_add" => {
                for (i, cap) in seq(v, &path)?.into_iter().enumerate() {
                    let cap = string(&cap, &format!("{path}[{i}]"))?;
                    c.cap_add
                        .push(cap.strip_prefix("CAP_").unwrap_or(&cap).to_owned());
                }
            }
            "devices" => {
                for (i, d) in seq(v, &path)?.into_iter().enumerate() {
                    c.devices.push(device(&d, &format!("{path}[{i}]"))?);
                }
            }
            "network_mode" => {
                c.network_mode = match string(&v, &path)?.as_str() {
                    "host" => NetworkMode::Host,
                    "none" => NetworkMode::None,
                    "bridge" => NetworkMode::Bridge,
                    other => return err(&path, format!("`{other}`: only host, none or bridge")),
                }
            }
            "labels" => {
                // Container labels have no place in the model (see the
                // module's notes); empty ones are harmless, any other
                // would be lost.
                if !is_empty(&v) {
                    return err(
                        &path,
                        "container labels are not supported by Drover: it sets no labels of yours on containers, and app labels (the app's `labels`, set through the API) are not container labels",
                    );
                }
            }
            _ => return unsupported(&path),
        }
    }
    if !has_image {
        return err(join(&base, "image"), "required (`build:` is not supported)");
    }
    Ok(c)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Mapping(m) => m.is_empty(),
        Value::Sequence(s) => s.is_empty(),
        _ => false,
    }
}

fn command(v: Value, path: &str) -> R<Vec<String>> {
    match v {
        Value::String(s) => shell_words(&s).map_err(|m| FieldError::new(path, m)),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, a)| string(a, &format!("{path}[{i}]")))
            .collect(),
        _ => err(path, "must be a string or a list of strings"),
    }
}

/// Splits a command string as Compose does (POSIX shell quoting, no
/// expansion): spaces separate, single quotes are literal, double quotes
/// and backslashes escape.
fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        match ch {
            ' ' | '\t' | '\n' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => cur.push(c),
                    None => return Err("trailing backslash".into()),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn environment(v: Value, path: &str) -> R<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let no_value = |p: &str, k: &str| {
        FieldError::new(
            p,
            format!("`{k}` has no value; Drover does not take values from the importing shell"),
        )
    };
    match v {
        Value::Mapping(m) => {
            for (k, val) in m {
                let k = key_str(&k, path)?;
                let p = join(path, &k);
                if val.is_null() {
                    return Err(no_value(&p, &k));
                }
                env.insert(k, string(&val, &p)?);
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let s = string(item, &p)?;
                match s.split_once('=') {
                    Some((k, val)) => {
                        env.insert(k.to_owned(), val.to_owned());
                    }
                    None => return Err(no_value(&p, &s)),
                }
            }
        }
        _ => return err(path, "must be a mapping or a list of KEY=VALUE"),
    }
    Ok(env)
}

fn port_num(s: &str, path: &str) -> R<u16> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(path, format!("`{s}` is not a port number (1-65535)")))
}

fn protocol(s: &str, path: &str) -> R<Protocol> {
    match s {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => err(path, format!("protocol `{other}`: only tcp or udp")),
    }
}

fn port(v: Value, path: &str) -> R<Vec<PortMapping>> {
    match v {
        Value::Mapping(m) => {
            let mut target = None;
            let mut published = None;
            let mut proto = Protocol::Tcp;
            let mut host_ip = None;
            for (k, v) in entries(m, path)? {
                let p = join(path, &k);
                match k.as_str() {
                    "target" => target = Some(port_num(&string(&v, &p)?, &p)?),
                    "published" => published = Some(port_num(&string(&v, &p)?, &p)?),
                    "protocol" => proto = protocol(&string(&v, &p)?, &p)?,
                    "host_ip" => host_ip = Some(string(&v, &p)?),
                    "mode" if string(&v, &p)? == "host" || string(&v, &p)? == "ingress" => {}
                    _ => return unsupported(&p),
                }
            }
            let container =
                target.ok_or_else(|| FieldError::new(join(path, "target"), "required"))?;
            let host = published.ok_or_else(|| {
                FieldError::new(
                    join(path, "published"),
                    "required: Drover publishes fixed ports",
                )
            })?;
            Ok(vec![PortMapping {
                host,
                container,
                protocol: proto,
                host_ip,
            }])
        }
        v => {
            let s = string(&v, path)?;
            let (rest, proto) = match s.rsplit_once('/') {
                Some((r, p)) => (r, protocol(p, path)?),
                None => (s.as_str(), Protocol::Tcp),
            };
            // [ip:]host:container; an IPv6 address comes in brackets.
            let (ip, rest) = if let Some(r) = rest.strip_prefix('[') {
                let (ip, r) = r
                    .split_once("]:")
                    .ok_or_else(|| FieldError::new(path, format!("`{s}`: bad IPv6 address")))?;
                (Some(ip.to_owned()), r)
            } else {
                match rest.matches(':').count() {
                    2 => {
                        let (ip, r) = rest.split_once(':').unwrap_or_default();
                        (Some(ip.to_owned()), r)
                    }
                    _ => (None, rest),
                }
            };
            let Some((h, c)) = rest.split_once(':') else {
                return err(
                    path,
                    format!("`{s}`: give the host port too (HOST:CONTAINER); Drover publishes fixed ports"),
                );
            };
            let range = |x: &str| -> R<(u16, u16)> {
                match x.split_once('-') {
                    Some((a, b)) => Ok((port_num(a, path)?, port_num(b, path)?)),
                    None => {
                        let p = port_num(x, path)?;
                        Ok((p, p))
                    }
                }
            };
            let (h0, h1) = range(h)?;
            let (c0, c1) = range(c)?;
            if h1 < h0 || c1 < c0 || h1 - h0 != c1 - c0 {
                return err(path, format!("`{s}`: the port ranges differ in length"));
            }
            Ok((0..=(c1 - c0))
                .map(|i| PortMapping {
                    host: h0 + i,
                    container: c0 + i,
                    protocol: proto,
                    host_ip: ip.clone().filter(|s| !s.is_empty()),
                })
                .collect())
        }
    }
}

fn mount(v: Value, path: &str, declared: &BTreeSet<String>, c: &mut ContainerSpec) -> R<()> {
    let (kind, source, target, read_only) = match v {
        Value::Mapping(m) => {
            let mut kind = None;
            let mut source = None;
            let mut target = None;
            let mut ro = false;
            for (k, v) in entries(m, path)? {
                let p = join(path, &k);
                match k.as_str() {
                    "type" => kind = Some(string(&v, &p)?),
                    "source" => source = Some(string(&v, &p)?),
                    "target" => target = Some(string(&v, &p)?),
                    "read_only" => ro = boolean(&v, &p)?,
                    _ => return unsupported(&p),
                }
            }
            let kind = kind.ok_or_else(|| FieldError::new(join(path, "type"), "required"))?;
            let source = source.ok_or_else(|| FieldError::new(join(path, "source"), "required"))?;
            let target = target.ok_or_else(|| FieldError::new(join(path, "target"), "required"))?;
            match kind.as_str() {
                "volume" | "bind" => {}
                other => {
                    return err(
                        join(path, "type"),
                        format!("`{other}`: only volume or bind"),
                    )
                }
            }
            (Some(kind), source, target, ro)
        }
        v => {
            let s = string(&v, path)?;
            let parts: Vec<&str> = s.split(':').collect();
            let (src, tgt, ro) = match parts.as_slice() {
                [src, tgt] => (*src, *tgt, false),
                [src, tgt, "ro"] => (*src, *tgt, true),
                [src, tgt, "rw"] => (*src, *tgt, false),
                [_, _, mode] => return err(path, format!("`{s}`: mode `{mode}`: only ro or rw")),
                [_] => {
                    return err(
                        path,
                        format!("`{s}`: anonymous volumes are not supported; name it"),
                    )
                }
                _ => return err(path, format!("`{s}`: expected SOURCE:TARGET[:ro]")),
            };
            (None, src.to_owned(), tgt.to_owned(), ro)
        }
    };
    let is_path = source.starts_with('/') || source.starts_with('.') || source.starts_with('~');
    let bind = match kind.as_deref() {
        Some("bind") => true,
        Some(_) => false,
        None => is_path,
    };
    if bind {
        if !source.starts_with('/') {
            return err(
                path,
                format!("`{source}`: a bind mount needs an absolute host path (relative ones are relative to your machine, not the device)"),
            );
        }
        c.host_mounts.push(HostMount {
            source,
            target,
            read_only,
        });
    } else {
        if !declared.contains(&source) {
            return err(
                path,
                format!("volume `{source}` is not declared under top-level `volumes`"),
            );
        }
        c.volumes.push(VolumeBind {
            source,
            target,
            read_only,
        });
    }
    Ok(())
}

/// A Compose duration (`1m30s`, `500ms`, `1h`, `10s`) in milliseconds.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a duration like 1m30s or 500ms");
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return Err(bad()),
        };
        let ms = n * scale;
        if !ms.is_finite() || ms > 1e15 {
            return Err(bad());
        }
        total = total.checked_add(ms.round() as u64).ok_or_else(bad)?;
    }
    Ok(total)
}

fn healthcheck(v: Value, path: &str) -> R<Option<HealthCheck>> {
    let mut hc = HealthCheck {
        test: Vec::new(),
        interval_ms: None,
        timeout_ms: None,
        retries: None,
        start_period_ms: None,
    };
    let mut disable = false;
    for (k, v) in entries(mapping(v, path)?, path)? {
        let p = join(path, &k);
        let dur = |v: &Value| -> R<u64> {
            duration_ms(&string(v, &p)?).map_err(|m| FieldError::new(&p, m))
        };
        match k.as_str() {
            "test" => {
                hc.test = match v {
                    Value::String(s) => vec!["CMD-SHELL".to_owned(), s],
                    Value::Sequence(items) => items
                        .iter()
                        .enumerate()
                        .map(|(i, a)| string(a, &format!("{p}[{i}]")))
                        .collect::<R<_>>()?,
                    _ => return err(&p, "must be a string or a list"),
                }
            }
            "interval" => hc.interval_ms = Some(dur(&v)?),
            "timeout" => hc.timeout_ms = Some(dur(&v)?),
            "start_period" => hc.start_period_ms = Some(dur(&v)?),
            "retries" => {
                hc.retries = Some(match &v {
                    Value::Number(n) => n
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| FieldError::new(&p, "must be a whole number"))?,
                    _ => return err(&p, "must be a whole number"),
                })
            }
            "disable" => disable = boolean(&v, &p)?,
            _ => return unsupported(&p),
        }
    }
    if disable {
        hc.test = vec!["NONE".to_owned()];
    } else if hc.test.is_empty() {
        return err(join(path, "test"), "required (or `disable: true`)");
    }
    Ok(Some(hc))
}

fn depends_on(v: Value, path: &str) -> R<Vec<Name>> {
    let name =
        |s: &str, p: &str| Name::new(s).map_err(|e| FieldError::new(p, format!("`{s}`: {e}")));
    let mut out = Vec::new();
    match v {
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                out.push(name(&string(item, &p)?, &p)?);
            }
        }
        Value::Mapping(m) => {
            for (dep, cond) in entries(m, path)? {
                let p = join(path, &dep);
                for (k, v) in entries(mapping(cond, &p)?, &p)? {
                    let pk = join(&p, &k);
                    match k.as_str() {
                        "condition" => match string(&v, &pk)?.as_str() {
                            // The agent waits for health where the
                            // dependency has a check, running otherwise.
                            "service_started" | "service_healthy" => {}
                            other => {
                                return err(
                                    &pk,
                                    format!("`{other}`: only service_started or service_healthy"),
                                )
                            }
                        },
                        "required" => {
                            if !boolean(&v, &pk)? {
                                return err(
                                    &pk,
                                    "only `required: true`: Drover always waits for a dependency",
                                );
                            }
                        }
                        _ => return unsupported(&pk),
                    }
                }
                out.push(name(&dep, &p)?);
            }
        }
        _ => return err(path, "must be a list or a mapping"),
    }
    Ok(out)
}

/// A Compose byte size (`512m`, `1g`, `1.5gb`, `300000k`, or a bare number
/// of bytes) in MiB, rounded up.
fn memory_mb(v: &Value, path: &str) -> R<u64> {
    let s = string(v, path)?;
    let bad = || FieldError::new(path, format!("`{s}` is not a size like 512m or 1g"));
    let t = s.trim().to_ascii_lowercase();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let scale: f64 = match unit.trim() {
        "" | "b" => 1.0 / (1024.0 * 1024.0),
        "k" | "kb" => 1.0 / 1024.0,
        "m" | "mb" => 1.0,
        "g" | "gb" => 1024.0,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mb = (n * scale).ceil();
    if !mb.is_finite() || mb > 1e15 {
        return err(path, format!("`{s}` is out of range"));
    }
    Ok(mb as u64)
}

fn cpus(v: &Value, path: &str) -> R<f64> {
    let s = string(v, path)?;
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|c| c.is_finite())
        .ok_or_else(|| FieldError::new(path, format!("`{s}` is not a number of CPUs")))
}

fn deploy(v: Value, path: &str, c: &mut ContainerSpec) -> R<()> {
    for (k, v) in entries(mapping(v, path)?, path)? {
        let p = join(path, &k);
        if k != "resources" {
            return unsupported(&p);
        }
        for (k, v) in entries(mapping(v, &p)?, &p)? {
            let p = join(&p, &k);
            if k != "limits" {
                return unsupported(&p);
            }
            for (k, v) in entries(mapping(v, &p)?, &p)? {
                let p = join(&p, &k);
                match k.as_str() {
                    "cpus" => c.cpus = Some(cpus(&v, &p)?),
                    "memory" => c.memory_mb = Some(memory_mb(&v, &p)?),
                    _ => return unsupported(&p),
                }
            }
        }
    }
    Ok(())
}

fn device(v: &Value, path: &str) -> R<DeviceMapping> {
    let s = string(v, path)?;
    let parts: Vec<&str> = s.split(':').collect();
    let (host, container, permissions) = match parts.as_slice() {
        [h] => (*h, None, None),
        [h, c] if c.starts_with('/') => (*h, Some(*c), None),
        [h, p] => (*h, None, Some(*p)),
        [h, c, p] => (*h, Some(*c), Some(*p)),
        _ => {
            return err(
                path,
                format!("`{s}`: expected HOST[:CONTAINER[:PERMISSIONS]]"),
            )
        }
    };
    Ok(DeviceMapping {
        host: host.to_owned(),
        container: container.map(str::to_owned),
        permissions: permissions.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests;
