//! Home Assistant MQTT discovery (opt-in, `drover serve
//! --homeassistant-user NAME`): every device appears as a Home Assistant
//! device with availability, CPU, memory and disk sensors and one switch
//! per app, all read from the JSON tree and commanded through the JSON
//! API as the identity `NAME` (whose role decides whether the switches
//! work: an operator's do, a viewer's are refused).
//!
//! Pure: [`Discovery`] turns a device view into the retained config
//! messages and remembers what it announced, so a config is published
//! again only when it changed and an app or device that went gets its
//! config removed (an empty retained message, as Home Assistant expects).

use std::collections::{BTreeMap, HashMap, HashSet};

use drover_shared::topic::{self, JsonKind, Topics};
use drover_shared::DeviceId;
use serde_json::{json, Value};

use crate::contract;

/// Where a sensor reads its value in `json/dev/<id>/telemetry`.
pub const SENSORS: [(&str, &str, &str); 3] = [
    ("cpu", "CPU", "cpu_percent"),
    ("memory", "Memory", "memory_percent"),
    ("disk", "Disk", "disk_percent"),
];

/// What has been announced, per device: topic → payload.
pub struct Discovery {
    topics: Topics,
    discovery: topic::Discovery,
    /// The automation identity Home Assistant logs in with: its switches
    /// publish their requests on its request topic.
    user: String,
    announced: HashMap<DeviceId, BTreeMap<String, Vec<u8>>>,
}

/// A node or object id as Home Assistant allows it (`[a-zA-Z0-9_-]`).
fn ha_id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Discovery {
    pub fn new(topics: Topics, discovery: topic::Discovery, user: String) -> Discovery {
        Discovery {
            topics,
            discovery,
            user,
            announced: HashMap::new(),
        }
    }

    pub fn status_topic(&self) -> String {
        self.discovery.status()
    }

    /// Unique across fleets sharing a Home Assistant: the topic root is
    /// part of it.
    fn unique(&self, device: &DeviceId, object: &str) -> String {
        format!("{}_{device}_{object}", ha_id(self.topics.root()))
    }

    /// Every config message for one device: (topic, JSON).
    pub fn configs(&self, view: &contract::Device) -> Vec<(String, Value)> {
        let id = &view.id;
        let node = ha_id(&format!("{}_{id}", self.topics.root()));
        let inv = view.inventory.as_ref();
        let mut device = json!({
            "identifiers": [self.unique(id, "device")],
            "name": id.as_str(),
            "manufacturer": "Drover",
        });
        if let Some(h) = inv {
            device["model"] = json!(format!("{} {}", h.os, h.arch));
            device["sw_version"] = json!(format!("drover-agent {}", h.agent_version));
            device["hw_version"] = json!(format!("{} CPUs", h.cpus));
        }
        let availability = json!([{
            "topic": self.topics.json_device(id, JsonKind::Status),
            "value_template": "{{ value_json.status }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }]);
        let origin = json!({"name": "Drover", "sw_version": env!("CARGO_PKG_VERSION")});
        let mut out = Vec::new();
        for (object, name, field) in SENSORS {
            out.push((
                self.discovery.config("sensor", &node, object),
                json!({
                    "name": name,
                    "unique_id": self.unique(id, object),
                    "object_id": ha_id(&format!("{id}_{object}")),
                    "state_topic": self.topics.json_device(id, JsonKind::Telemetry),
                    "value_template": format!("{{{{ value_json.{field} }}}}"),
                    "unit_of_measurement": "%",
                    "state_class": "measurement",
                    "availability": availability,
                    "device": device,
                    "origin": origin,
                }),
            ));
        }
        let apps = view.desired.as_ref().map(|d| d.apps.as_slice());
        for app in apps.unwrap_or_default() {
            let name = app.spec.name.as_str();
            let object = format!("app_{}", ha_id(name));
            let request = |cmd: &str| {
                json!({"id": format!("ha-{id}-{name}-{cmd}"), "cmd": cmd, "device": id, "app": name})
                    .to_string()
            };
            out.push((
                self.discovery.config("switch", &node, &object),
                json!({
                    "name": name,
                    "unique_id": self.unique(id, &object),
                    "object_id": ha_id(&format!("{id}_{object}")),
                    "state_topic": self.topics.json_device(id, JsonKind::State),
                    "value_template": format!(
                        "{{{{ 'ON' if value_json.apps['{name}'] is defined and value_json.apps['{name}'].running else 'OFF' }}}}"
                    ),
                    "state_on": "ON",
                    "state_off": "OFF",
                    "command_topic": self.topics.json_request(&self.user),
                    "payload_on": request("start"),
                    "payload_off": request("stop"),
                    "retain": false,
                    "availability": availability,
                    "device": device,
                    "origin": origin,
                }),
            ));
        }
        out
    }

    /// What to publish (retained) for this device now: configs new or
    /// changed since the last announcement, and an empty payload for each
    /// announced config the device no longer has (an app that went).
    pub fn update(&mut self, view: &contract::Device) -> Vec<(String, Vec<u8>)> {
        let now: BTreeMap<String, Vec<u8>> = self
            .configs(view)
            .into_iter()
            .map(|(t, v)| (t, serde_json::to_vec(&v).unwrap_or_default()))
            .collect();
        let before = self.announced.remove(&view.id).unwrap_or_default();
        let mut out: Vec<(String, Vec<u8>)> = before
            .keys()
            .filter(|t| !now.contains_key(*t))
            .map(|t| (t.clone(), Vec::new()))
            .collect();
        out.extend(
            now.iter()
                .filter(|(t, p)| before.get(*t) != Some(*p))
                .map(|(t, p)| (t.clone(), p.clone())),
        );
        self.announced.insert(view.id.clone(), now);
        out
    }

    /// Removes the configs of every announced device not in `present`.
    pub fn remove_missing(&mut self, present: &HashSet<DeviceId>) -> Vec<(String, Vec<u8>)> {
        let gone: Vec<DeviceId> = self
            .announced
            .keys()
            .filter(|d| !present.contains(*d))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for d in gone {
            if let Some(configs) = self.announced.remove(&d) {
                out.extend(configs.into_keys().map(|t| (t, Vec::new())));
            }
        }
        out
    }

    /// Forgets what was announced, so the next updates announce it all
    /// again (Home Assistant came online and asks for it).
    pub fn forget(&mut self) {
        for configs in self.announced.values_mut() {
            configs.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(apps: &[&str]) -> contract::Device {
        let desired = drover_shared::model::DesiredState {
            generation: 1,
            apps: apps
                .iter()
                .map(|n| drover_shared::model::DesiredApp {
                    spec: serde_json::from_value(json!({
                        "name": n, "containers": [{"name": "main", "image": "busybox:1"}]
                    }))
                    .expect("spec"),
                    run: drover_shared::model::RunState::Running,
                    started_at: 1,
                    release: 1,
                    restarted_at: 0,
                })
                .collect(),
            agent: None,
        };
        serde_json::from_value(json!({
            "id": "pi.01", "online": true, "first_seen_ms": 0, "last_seen_ms": 0,
            "desired_generation": 1, "applied_generation": 1,
            "desired": serde_json::to_value(desired).expect("json"),
        }))
        .expect("view")
    }

    fn ha() -> Discovery {
        Discovery::new(Topics::default(), topic::Discovery::default(), "ha".into())
    }

    #[test]
    fn sensors_and_a_switch_per_app_with_unique_ids() {
        let d = ha();
        let configs = d.configs(&view(&["web", "db"]));
        assert_eq!(configs.len(), 5);
        let mut ids = HashSet::new();
        for (topic, c) in &configs {
            assert!(topic.starts_with("homeassistant/"), "{topic}");
            assert!(
                topic.contains("/drover_pi_01/"),
                "node ids are [a-zA-Z0-9_-]: {topic}"
            );
            assert!(ids.insert(c["unique_id"].as_str().expect("id").to_string()));
            assert!(c["availability"][0]["topic"]
                .as_str()
                .is_some_and(|t| t.ends_with("/json/dev/pi.01/status")));
        }
        let switch = &configs
            .iter()
            .find(|(t, _)| t.contains("/switch/"))
            .expect("switch")
            .1;
        assert_eq!(switch["command_topic"], "drover/v1/json/req/ha");
        let on: Value =
            serde_json::from_str(switch["payload_on"].as_str().expect("on")).expect("json");
        assert_eq!(on["cmd"], "start");
        assert_eq!(on["device"], "pi.01");
    }

    #[test]
    fn only_changes_are_published_and_gone_apps_are_removed() {
        let mut d = ha();
        assert_eq!(d.update(&view(&["web", "db"])).len(), 5);
        assert!(
            d.update(&view(&["web", "db"])).is_empty(),
            "nothing changed"
        );
        let out = d.update(&view(&["web"]));
        assert_eq!(out.len(), 1);
        assert!(out[0].0.ends_with("/app_db/config") && out[0].1.is_empty());
        d.forget();
        assert_eq!(d.update(&view(&["web"])).len(), 4, "announced again");
        let gone = d.remove_missing(&HashSet::new());
        assert_eq!(gone.len(), 4);
        assert!(gone.iter().all(|(_, p)| p.is_empty()));
    }
}
