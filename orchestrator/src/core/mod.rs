//! The pure core: state machines that return effects (store writes,
//! publications, changes) and do no I/O. Unit-tested without tokio, redb,
//! axum or rumqttc.

pub mod agent_releases;
pub mod command;
pub mod compose;
pub mod fleet;
pub mod jobs;
pub mod ops;
pub mod platforms;
pub mod records;
pub mod registries;
pub mod rollout;
pub mod rules;
pub mod selector;
