//! Who connects to the broker, by MQTT username.
//!
//! A device connects with its device id as both client id and username and
//! the password it received at enrollment. Every other identity has a
//! username starting with `$`, which no device id can (ids start with a
//! letter or digit), so no device can pose as one of them.

/// The username an agent uses, once, to present an enrollment token.
pub const ENROLL_USERNAME: &str = "$enroll";

/// The orchestrator's own connection to its embedded broker.
pub const ORCHESTRATOR_USERNAME: &str = "$orchestrator";

/// Prefix of automation identities: `$auto:<name>`.
pub const AUTOMATION_PREFIX: &str = "$auto:";

/// The MQTT username of the automation identity `name`.
pub fn automation_username(name: &str) -> String {
    format!("{AUTOMATION_PREFIX}{name}")
}
