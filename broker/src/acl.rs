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
    /// Whatever it is granted, it always reads its own response topic
    /// and publishes on its own request topic, and never reads another
    /// identity's responses.
    Automation {
        name: String,
        subscribe: Vec<String>,
        publish: Vec<String>,
    },
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid MQTT filter (or a malformed `$share/<group>/`).
    Invalid,
    /// `$SYS/...` and other broker topics are not Drover's to grant.
    BrokerTopics,
    /// A device or enrolling device asked for something not its own.
    NotOwn,
    /// It reaches what devices are told or handed (these kinds), which
    /// only the device itself and the orchestrator ever read.
    Confidential(Vec<&'static str>),
    /// It reaches other automation identities' responses.
    OthersResponses,
    /// Outside what this identity was granted.
    NotGranted,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid => f.write_str("not a valid topic filter"),
            Refusal::BrokerTopics => f.write_str("broker ($) topics are not granted"),
            Refusal::NotOwn => f.write_str("not one of the client's own topics"),
            Refusal::Confidential(kinds) => write!(
                f,
                "the filter reaches confidential device topics ({}); subscribe to the reported kinds one by one, or to the JSON tree",
                kinds.join(", ")
            ),
            Refusal::OthersResponses => {
                f.write_str("the filter reaches other identities' response topics")
            }
            Refusal::NotGranted => f.write_str("outside the identity's subscribe grants"),
        }
    }
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
            Principal::Automation { name, publish, .. } => {
                // The JSON tree is the orchestrator's, but for each
                // identity's own request topic: whoever publishes on
                // `json/req/<name>` is `<name>`, which is what makes a
                // request's actor true.
                if filter::matches(&topics.json_space(), topic) {
                    return !retain && topic == topics.json_request(name);
                }
                // Nobody but a device speaks for a device, and nobody but
                // the orchestrator tells one what to do.
                !filter::matches(&device_space(topics), topic)
                    && publish.iter().any(|f| filter::matches(f, topic))
            }
        }
    }

    pub fn may_subscribe(&self, topics: &Topics, requested: &str) -> bool {
        self.subscribe_refusal(topics, requested).is_none()
    }

    /// Why this principal may not subscribe to `requested`, or `None`
    /// when it may: the reason goes into the broker's log line, so an
    /// operator reading it knows what to grant or what to ask for instead.
    pub fn subscribe_refusal(&self, topics: &Topics, requested: &str) -> Option<Refusal> {
        if matches!(self, Principal::Owner) {
            return None;
        }
        // A shared subscription (`$share/<group>/<filter>`) delivers what
        // `<filter>` matches: rumqttd strips the prefix, so the rules apply
        // to the filter inside it. Devices get exact topics only, never a
        // shared one. Any other `$` filter (`$SYS/…`) is not Drover's to
        // grant.
        let requested = match (self, requested.strip_prefix("$share/")) {
            (Principal::Automation { .. }, Some(rest)) => match rest.split_once('/') {
                Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => inner,
                _ => return Some(Refusal::Invalid),
            },
            _ => requested,
        };
        if !filter::valid_filter(requested) {
            return Some(Refusal::Invalid);
        }
        if requested.starts_with('$') {
            return Some(Refusal::BrokerTopics);
        }
        let own = |ok: bool| (!ok).then_some(Refusal::NotOwn);
        match self {
            Principal::Owner => None,
            // Exact topics only: no wildcard can reach another device.
            Principal::Device(id) => own(matches!(
                topics.parse(requested),
                Some((d, k)) if &d == id && DEVICE_READS.contains(&k)
            )),
            Principal::Enrolling(id) => own(matches!(
                topics.parse(requested),
                Some((d, TopicKind::Enrolled)) if &d == id
            )),
            Principal::Automation {
                name, subscribe, ..
            } => {
                let own_responses = topics.json_response(name);
                if filter::covers(&own_responses, requested) {
                    return None;
                }
                if filter::intersects(&topics.json_responses(), requested) {
                    return Some(Refusal::OthersResponses);
                }
                if let Some(kinds) = confidential_reach(topics, requested) {
                    return Some(Refusal::Confidential(kinds));
                }
                (!subscribe.iter().any(|f| filter::covers(f, requested)))
                    .then_some(Refusal::NotGranted)
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
/// run, the credentials for it and the agent binary chunks it fetched (its
/// `enrolled` answer is read under the `$enroll` identity, not as the
/// device).
const DEVICE_READS: [TopicKind; 4] = [
    TopicKind::Cmd,
    TopicKind::Desired,
    TopicKind::Secrets,
    TopicKind::Blob,
];

fn device_space(topics: &Topics) -> String {
    format!("{}/v1/dev/#", topics.root())
}

/// The confidential kinds a filter reaches, if any.
fn confidential_reach(topics: &Topics, requested: &str) -> Option<Vec<&'static str>> {
    let kinds: Vec<&'static str> = TopicKind::ALL
        .into_iter()
        .filter(|k| k.confidential())
        .filter(|k| filter::intersects(&topics.all_devices(*k), requested))
        .map(TopicKind::as_str)
        .collect();
    (!kinds.is_empty()).then_some(kinds)
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
        if filter::intersects(&topics.json_space(), f) {
            return Err(InvalidGrant {
                field: format!("publish[{i}]"),
                message: format!(
                    "{f:?} reaches the JSON tree ({}), where only the orchestrator publishes; an identity's own request topic needs no grant",
                    topics.json_space()
                ),
            });
        }
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

/// What an automation identity may read unless told otherwise: the JSON
/// tree (devices and fleet) and everything devices report about
/// themselves (CBOR), nothing they are told. Its own response topic needs
/// no grant.
pub fn default_automation_subscribe(topics: &Topics) -> Vec<String> {
    [topics.json_devices(), topics.json_fleet()]
        .into_iter()
        .chain(
            [
                TopicKind::Status,
                TopicKind::Heartbeat,
                TopicKind::State,
                TopicKind::Telemetry,
                TopicKind::Hello,
                TopicKind::Event,
            ]
            .into_iter()
            .map(|k| topics.all_devices(k)),
        )
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
        // Edge job reports: its own only, never retained.
        let job = |d: &str| topics.device(&id(d), TopicKind::Job);
        assert!(a.may_publish(&topics, &job("a"), false));
        assert!(!a.may_publish(&topics, &job("b"), false));
        assert!(!a.may_publish(&topics, &job("a"), true));
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
    fn agent_binaries_go_only_to_the_device_that_fetched_them() {
        let topics = t();
        let a = Principal::Device(id("a"));
        let fetch = |d: &str| topics.device(&id(d), TopicKind::Fetch);
        let blob = |d: &str| topics.device(&id(d), TopicKind::Blob);
        assert!(a.may_publish(&topics, &fetch("a"), false));
        assert!(!a.may_publish(&topics, &fetch("a"), true), "never retained");
        assert!(!a.may_publish(&topics, &fetch("b"), false));
        assert!(!a.may_publish(&topics, &blob("a"), false));
        assert!(a.may_subscribe(&topics, &blob("a")));
        assert!(!a.may_subscribe(&topics, &blob("b")));
        assert!(!a.may_subscribe(&topics, &fetch("a")));
        let auto = Principal::Automation {
            name: "n".into(),
            subscribe: vec!["#".into()],
            publish: vec!["#".into()],
        };
        for f in [blob("a"), topics.all_devices(TopicKind::Blob)] {
            assert_eq!(
                auto.subscribe_refusal(&topics, &f),
                Some(Refusal::Confidential(vec!["blob"])),
                "{f}"
            );
        }
        assert!(!auto.may_publish(&topics, &fetch("a"), false));
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

    fn auto(name: &str, subscribe: Vec<String>, publish: Vec<String>) -> Principal {
        Principal::Automation {
            name: name.into(),
            subscribe,
            publish,
        }
    }

    #[test]
    fn each_identity_requests_on_its_own_topic_and_reads_only_its_own_answers() {
        let topics = t();
        let nr = auto("nr", default_automation_subscribe(&topics), vec![]);
        let greedy = auto("greedy", vec!["#".into()], vec!["home/#".into()]);
        assert!(nr.may_publish(&topics, "drover/v1/json/req/nr", false));
        assert!(
            !nr.may_publish(&topics, "drover/v1/json/req/nr", true),
            "a retained request would run again"
        );
        assert!(!nr.may_publish(&topics, "drover/v1/json/req/other", false));
        assert!(!greedy.may_publish(&topics, "drover/v1/json/req/nr", false));
        for forged in [
            "drover/v1/json/res/nr",
            "drover/v1/json/dev/pi/telemetry",
            "drover/v1/json/fleet/operations",
        ] {
            assert!(!nr.may_publish(&topics, forged, false), "{forged}");
            assert!(!greedy.may_publish(&topics, forged, false), "{forged}");
        }
        assert!(nr.may_subscribe(&topics, "drover/v1/json/res/nr"));
        assert!(greedy.may_subscribe(&topics, "drover/v1/json/res/greedy"));
        for other in [
            "drover/v1/json/res/nr",
            "drover/v1/json/res/+",
            "drover/v1/json/#",
            "drover/v1/+/res/nr",
            "$share/g/drover/v1/json/res/nr",
        ] {
            assert_eq!(
                greedy.subscribe_refusal(&topics, other),
                Some(Refusal::OthersResponses),
                "{other}"
            );
        }
        assert!(!nr.may_subscribe(&topics, "drover/v1/json/res/other"));
        // The JSON tree is in the default grant, and so are the reported
        // CBOR topics.
        for f in [
            "drover/v1/json/dev/+/telemetry",
            "drover/v1/json/dev/#",
            "drover/v1/json/fleet/#",
            "drover/v1/json/fleet/rollouts/+",
            "drover/v1/dev/+/telemetry",
        ] {
            assert!(nr.may_subscribe(&topics, f), "{f}");
        }
        assert!(greedy.may_subscribe(&topics, "drover/v1/json/dev/#"));
    }

    #[test]
    fn refusals_say_why() {
        let topics = t();
        let nr = auto("nr", default_automation_subscribe(&topics), vec![]);
        match nr.subscribe_refusal(&topics, "drover/v1/dev/+/#") {
            Some(Refusal::Confidential(kinds)) => {
                assert_eq!(
                    kinds,
                    ["cmd", "desired", "enroll", "enrolled", "secrets", "blob"]
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            nr.subscribe_refusal(&topics, "drover/v1/dev/+/logs"),
            Some(Refusal::NotGranted)
        );
        assert_eq!(
            nr.subscribe_refusal(&topics, "a/#/b"),
            Some(Refusal::Invalid)
        );
        assert_eq!(
            nr.subscribe_refusal(&topics, "$SYS/#"),
            Some(Refusal::BrokerTopics)
        );
        let text = Refusal::Confidential(vec!["cmd"]).to_string();
        assert!(text.contains("cmd") && text.contains("JSON tree"), "{text}");
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
        assert!(
            matches!(validate_grants(&topics, &[], &["ok/x".into(), "drover/v1/json/req/x".into()]), Err(e) if e.field == "publish[1]" && e.message.contains("JSON tree"))
        );
        assert!(validate_grants(&topics, &[], &["drover/+/json/#".into()]).is_err());
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
