//! Who may publish and subscribe where: pure rules, no I/O.
//!
//! rumqttd has no authorization of its own; [`crate::guard::Guard`] asks
//! these rules about every PUBLISH, SUBSCRIBE and Last Will it sees.

use drover_shared::filter;
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;

/// An authenticated broker client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Everything: the orchestrator's own connection, and every client when
    /// broker authentication is switched off.
    Owner,
    /// An enrolled device: its own device topics only.
    Device(DeviceId),
    /// A device presenting an enrollment token: its `enroll` and
    /// `enrolled` topics only.
    Enrolling(DeviceId),
    /// An automation client with explicit permissions, always minus the
    /// confidential device topics and minus publishing as a device.
    Automation {
        name: String,
        subscribe: Vec<String>,
        publish: Vec<String>,
    },
}

impl Principal {
    /// Whether this principal may publish on `topic`, retained or not.
    ///
    /// A device may retain only on the kinds the protocol retains (a
    /// retained `ack` or `enroll` would be handed to the orchestrator again
    /// on every reconnect), and an enrolling device never retains (its
    /// token would stay in the broker).
    pub fn may_publish(&self, topics: &Topics, topic: &str, retain: bool) -> bool {
        match self {
            Principal::Owner => true,
            Principal::Device(id) => matches!(
                topics.parse(topic),
                Some((d, k)) if &d == id
                    && TopicKind::FROM_DEVICE.contains(&k)
                    && k != TopicKind::Enroll
                    && (!retain || k.retained())
            ),
            Principal::Enrolling(id) => {
                !retain && matches!(topics.parse(topic), Some((d, TopicKind::Enroll)) if &d == id)
            }
            Principal::Automation { publish, .. } => {
                // Nobody but a device speaks for a device, and nobody but
                // the orchestrator tells one what to do.
                !filter::matches(&device_space(topics), topic)
                    && publish.iter().any(|f| filter::matches(f, topic))
            }
        }
    }

    pub fn may_subscribe(&self, topics: &Topics, requested: &str) -> bool {
        if matches!(self, Principal::Owner) {
            return true;
        }
        // A shared subscription (`$share/<group>/<filter>`) delivers what
        // `<filter>` matches: rumqttd strips the prefix, so the rules apply
        // to the filter inside it. Devices get exact topics only, never a
        // shared one. Any other `$` filter (`$SYS/…`) is not Drover's to
        // grant.
        let requested = match (self, requested.strip_prefix("$share/")) {
            (Principal::Automation { .. }, Some(rest)) => match rest.split_once('/') {
                Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => inner,
                _ => return false,
            },
            _ => requested,
        };
        if !filter::valid_filter(requested) || requested.starts_with('$') {
            return false;
        }
        match self {
            Principal::Owner => true,
            // Exact topics only: no wildcard can reach another device.
            Principal::Device(id) => matches!(
                topics.parse(requested),
                Some((d, k)) if &d == id && DEVICE_READS.contains(&k)
            ),
            Principal::Enrolling(id) => {
                matches!(topics.parse(requested), Some((d, TopicKind::Enrolled)) if &d == id)
            }
            Principal::Automation { subscribe, .. } => {
                subscribe.iter().any(|f| filter::covers(f, requested))
                    && !confidential_filters(topics)
                        .iter()
                        .any(|c| filter::intersects(c, requested))
            }
        }
    }

    /// The Last Will is a publish made on the client's behalf later: the
    /// same rule applies, and a device may only will its own status.
    pub fn may_will(&self, topics: &Topics, topic: &str) -> bool {
        match self {
            Principal::Device(id) => {
                matches!(topics.parse(topic), Some((d, TopicKind::Status)) if &d == id)
            }
            Principal::Enrolling(_) => false,
            other => other.may_publish(topics, topic, true),
        }
    }

    /// The client id rumqttd keys this client's session by. rumqttd lets a
    /// new connection take over the session of any live or persisted one
    /// with the same client id — its subscriptions included — so every
    /// identity that may pick its client id freely gets its own namespace,
    /// which no device id (no `:` in it) and no other identity can reach:
    /// an automation client calling itself `pi-01` must not inherit
    /// device `pi-01`'s `cmd`, `desired` and `secrets` subscriptions, and a
    /// device enrolled as `drover-orchestrator` must not inherit the
    /// orchestrator's. `None` keeps the client id: a device's (and an
    /// enrolling device's) client id already is its identity, and an
    /// empty one is left to rumqttd (which refuses it for a persistent
    /// session and assigns a random one otherwise).
    pub fn session_id(&self, client_id: &str) -> Option<String> {
        if client_id.is_empty() {
            return None;
        }
        match self {
            Principal::Device(_) | Principal::Enrolling(_) => None,
            Principal::Owner => Some(format!("owner:{client_id}")),
            Principal::Automation { name, .. } => Some(format!("auto:{name}:{client_id}")),
        }
    }
}

/// What a device may subscribe to on its own topics: what it is told to
/// run and the credentials for it (its `enrolled` answer is read under the
/// `$enroll` identity, not as the device).
const DEVICE_READS: [TopicKind; 3] = [TopicKind::Cmd, TopicKind::Desired, TopicKind::Secrets];

fn device_space(topics: &Topics) -> String {
    format!("{}/v1/dev/#", topics.root())
}

fn confidential_filters(topics: &Topics) -> Vec<String> {
    TopicKind::ALL
        .into_iter()
        .filter(|k| k.confidential())
        .map(|k| topics.all_devices(k))
        .collect()
}

/// A permission filter that cannot be granted, naming it by its place
/// (`subscribe[0]`, `publish[2]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidGrant {
    pub field: String,
    pub message: String,
}

/// Checks automation permission filters when they are granted, so a typo
/// is an error at creation rather than a silent refusal later.
pub fn validate_grants(
    topics: &Topics,
    subscribe: &[String],
    publish: &[String],
) -> Result<(), InvalidGrant> {
    for (field, list) in [("subscribe", subscribe), ("publish", publish)] {
        for (i, f) in list.iter().enumerate() {
            if !filter::valid_filter(f) {
                return Err(InvalidGrant {
                    field: format!("{field}[{i}]"),
                    message: format!("{f:?} is not a valid MQTT topic filter"),
                });
            }
        }
    }
    for (i, f) in publish.iter().enumerate() {
        if filter::intersects(&device_space(topics), f) {
            return Err(InvalidGrant {
                field: format!("publish[{i}]"),
                message: format!(
                    "{f:?} reaches device topics ({}), which only devices and the orchestrator may publish on",
                    device_space(topics)
                ),
            });
        }
    }
    Ok(())
}

/// What an automation identity may read unless told otherwise: everything
/// devices report about themselves, nothing they are told.
pub fn default_automation_subscribe(topics: &Topics) -> Vec<String> {
    [
        TopicKind::Status,
        TopicKind::Heartbeat,
        TopicKind::State,
        TopicKind::Telemetry,
        TopicKind::Hello,
        TopicKind::Event,
    ]
    .into_iter()
    .map(|k| topics.all_devices(k))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Topics {
        Topics::default()
    }
    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("valid id")
    }

    #[test]
    fn a_device_publishes_only_on_its_own_device_topics() {
        let a = Principal::Device(id("a"));
        let topics = t();
        for k in TopicKind::FROM_DEVICE {
            let own = topics.device(&id("a"), k);
            assert_eq!(
                a.may_publish(&topics, &own, false),
                k != TopicKind::Enroll,
                "{own}"
            );
            assert!(
                !a.may_publish(&topics, &topics.device(&id("b"), k), false),
                "{k}"
            );
        }
        for k in TopicKind::TO_DEVICE {
            assert!(
                !a.may_publish(&topics, &topics.device(&id("a"), k), false),
                "{k}"
            );
        }
        assert!(!a.may_publish(&topics, "drover/v1/other", false));
        assert!(!a.may_publish(&topics, "elsewhere", false));
    }

    #[test]
    fn a_device_subscribes_only_to_its_own_inbound_topics() {
        let a = Principal::Device(id("a"));
        let topics = t();
        for k in TopicKind::TO_DEVICE {
            assert_eq!(
                a.may_subscribe(&topics, &topics.device(&id("a"), k)),
                k != TopicKind::Enrolled,
                "{k}"
            );
            assert!(!a.may_subscribe(&topics, &topics.device(&id("b"), k)));
        }
        for f in [
            "#",
            "drover/#",
            "drover/v1/dev/+/cmd",
            "drover/v1/dev/a/+",
            "drover/v1/dev/a/#",
            "drover/v1/dev/a/status",
            "drover/v1/dev/b/telemetry",
            "$share/g/drover/v1/dev/b/cmd",
            "$share/g/drover/v1/dev/a/cmd",
            "$SYS/#",
        ] {
            assert!(!a.may_subscribe(&topics, f), "{f}");
        }
    }

    #[test]
    fn a_device_retains_only_what_the_protocol_retains() {
        let a = Principal::Device(id("a"));
        let topics = t();
        for k in TopicKind::FROM_DEVICE {
            let own = topics.device(&id("a"), k);
            assert_eq!(
                a.may_publish(&topics, &own, true),
                k.retained() && k != TopicKind::Enroll,
                "{own}"
            );
        }
    }

    #[test]
    fn a_device_may_only_will_its_own_status() {
        let a = Principal::Device(id("a"));
        let topics = t();
        assert!(a.may_will(&topics, &topics.device(&id("a"), TopicKind::Status)));
        assert!(!a.may_will(&topics, &topics.device(&id("b"), TopicKind::Status)));
        assert!(!a.may_will(&topics, &topics.device(&id("a"), TopicKind::State)));
    }

    #[test]
    fn enrolling_is_limited_to_the_enrollment_exchange() {
        let e = Principal::Enrolling(id("a"));
        let topics = t();
        assert!(e.may_publish(&topics, &topics.device(&id("a"), TopicKind::Enroll), false));
        assert!(!e.may_publish(&topics, &topics.device(&id("b"), TopicKind::Enroll), false));
        assert!(!e.may_publish(&topics, &topics.device(&id("a"), TopicKind::Status), false));
        assert!(e.may_subscribe(&topics, &topics.device(&id("a"), TopicKind::Enrolled)));
        assert!(!e.may_subscribe(&topics, &topics.device(&id("b"), TopicKind::Enrolled)));
        assert!(!e.may_subscribe(&topics, &topics.device(&id("a"), TopicKind::Cmd)));
        assert!(!e.may_will(&topics, &topics.device(&id("a"), TopicKind::Status)));
        assert!(
            !e.may_publish(&topics, &topics.device(&id("a"), TopicKind::Enroll), true),
            "a retained enroll would keep the token in the broker"
        );
    }

    #[test]
    fn automation_never_reads_confidential_topics_even_with_hash() {
        let topics = t();
        let auto = Principal::Automation {
            name: "n".into(),
            subscribe: vec!["#".into()],
            publish: vec!["#".into()],
        };
        assert!(auto.may_subscribe(&topics, "drover/v1/dev/+/telemetry"));
        assert!(auto.may_subscribe(&topics, "drover/v1/dev/a/status"));
        for f in [
            "#",
            "drover/#",
            "drover/v1/dev/+/+",
            "drover/v1/dev/a/cmd",
            "drover/v1/dev/+/desired",
            "drover/v1/dev/a/enrolled",
            // rumqttd strips `$share/<group>/` and subscribes to the rest.
            "$share/g/drover/v1/dev/+/secrets",
            "$share/g/drover/v1/dev/a/cmd",
            "$share/g/#",
            "$share//drover/v1/dev/+/telemetry",
            "$share/g",
            "$share/+/drover/v1/dev/+/telemetry",
            "$SYS/#",
        ] {
            assert!(!auto.may_subscribe(&topics, f), "{f}");
        }
        assert!(auto.may_subscribe(&topics, "$share/g/drover/v1/dev/+/telemetry"));
        // Never as a device, never a command.
        assert!(!auto.may_publish(&topics, "drover/v1/dev/a/status", false));
        assert!(!auto.may_publish(&topics, "drover/v1/dev/a/cmd", false));
        assert!(auto.may_publish(&topics, "home/lights", false));
    }

    #[test]
    fn automation_gets_what_it_was_granted_and_no_more() {
        let topics = t();
        let auto = Principal::Automation {
            name: "n".into(),
            subscribe: default_automation_subscribe(&topics),
            publish: vec![],
        };
        assert!(auto.may_subscribe(&topics, "drover/v1/dev/+/telemetry"));
        assert!(auto.may_subscribe(&topics, "drover/v1/dev/x/heartbeat"));
        assert!(!auto.may_subscribe(&topics, "drover/v1/dev/x/logs"));
        assert!(!auto.may_subscribe(&topics, "drover/v1/dev/#"));
        assert!(!auto.may_publish(&topics, "anything", false));
    }

    #[test]
    fn grants_are_validated() {
        let topics = t();
        assert!(validate_grants(&topics, &["a/#".into()], &["b/c".into()]).is_ok());
        assert!(
            matches!(validate_grants(&topics, &["a/#/b".into()], &[]), Err(e) if e.field == "subscribe[0]")
        );
        assert!(
            matches!(validate_grants(&topics, &[], &["#".into()]), Err(e) if e.field == "publish[0]")
        );
        assert!(validate_grants(&topics, &[], &["drover/v1/dev/x/cmd".into()]).is_err());
    }

    #[test]
    fn only_devices_keep_their_client_id_as_session() {
        let auto = |n: &str| Principal::Automation {
            name: n.into(),
            subscribe: vec![],
            publish: vec![],
        };
        assert_eq!(Principal::Device(id("pi")).session_id("pi"), None);
        assert_eq!(Principal::Enrolling(id("pi")).session_id("pi"), None);
        let taken = [
            auto("nodered").session_id("pi"),
            auto("other").session_id("pi"),
            Principal::Owner.session_id("pi"),
        ];
        for s in &taken {
            let s = s.as_deref().expect("namespaced");
            assert!(DeviceId::new(s).is_err(), "{s} could be a device id");
        }
        assert_ne!(taken[0], taken[1], "identities do not share sessions");
        assert_eq!(auto("nodered").session_id(""), None);
    }

    #[test]
    fn owner_may_do_anything() {
        let topics = t();
        assert!(Principal::Owner.may_subscribe(&topics, "#"));
        assert!(Principal::Owner.may_publish(&topics, "drover/v1/dev/a/cmd", false));
    }
}
